"""Convert a released HART checkpoint into a diffusers folder that `HARTPipeline.from_pretrained` loads.

Released layout (e.g. `hart-0.7b-1024px/`):

    llm/config.json                 HARTForT2IConfig
    llm/model.safetensors           weights (or pytorch_model.bin)
    llm/ema_model.bin               EMA weights (the ones the original samples with)
    tokenizer/config.json           HARTAutoEncoderWithDisc config
    tokenizer/model.safetensors     `vae.*` (kept) and `disc.*` (discriminator, dropped)

plus a Qwen2 text-encoder folder (model + tokenizer). Usage:

    python conversion/convert_hart_to_diffusers.py --checkpoint_path hart-0.7b-1024px \
        --text_encoder_path Qwen2-VL-1.5B-Instruct --output_path hart-0.7b-1024px-diffusers
"""

import argparse
import json
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..models import HARTAutoEncoder, HARTTransformer2DModel
from ..pipelines import HARTPipeline
from ..schedulers import HARTResidualDiffusionScheduler
from .state_dict_utils import load_checkpoint_file
from .tokenizer_checkpoint import load_tokenizer_folder
from .transformer_checkpoint import convert_transformer_config, convert_transformer_state_dict

# The system prompt of the original release (hart/utils/constants.py), stored in the converted pipeline's config.
HART_SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation.\n\nExamples:\n"
    "- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping peacefully on a "
    "warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a "
    "diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.\n\n"
    "Please generate only the enhanced description for the prompt below and DO NOT include any additional sentences. "
    'Start your response with "Enhanced Prompt:".\n\nUser Prompt:\n'
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Written into the converted folder so that plain diffusers can load it with
# `DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`.
CUSTOM_PIPELINE_FILE = '''"""Loads this folder with plain diffusers: requires `pip install diffusers_hart`."""

from diffusers_hart import HARTPipeline

__all__ = ["HARTPipeline"]
'''


def load_weights(folder: Path, use_ema: bool) -> Dict[str, torch.Tensor]:
    """Weights of a released `llm/` folder: EMA (`ema_model.bin`) or plain (`model.safetensors` / `pytorch_model.bin`)."""
    return load_checkpoint_file(folder, ["ema_model.bin"] if use_ema else ["model.safetensors", "pytorch_model.bin"])


def convert_transformer_folder(llm_folder: Union[str, os.PathLike], vae: HARTAutoEncoder, use_ema: bool = True):
    """Build `(HARTTransformer2DModel, num_inference_steps)` from a released `llm/` folder."""
    llm_folder = Path(llm_folder)
    original_config = json.loads((llm_folder / "config.json").read_text())
    config, num_steps = convert_transformer_config(original_config, dict(vae.config))
    model = HARTTransformer2DModel(**config)
    weights = load_weights(llm_folder, use_ema)
    state_dict = convert_transformer_state_dict(weights, config, checkpoint=str(llm_folder))
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), num_steps


def build_pipeline_from_original(
    checkpoint_path: Union[str, os.PathLike],
    text_encoder_path: Union[str, os.PathLike],
    use_ema: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> HARTPipeline:
    """A ready `HARTPipeline` from the released `{llm,tokenizer}` folder and a Qwen2 text-encoder folder."""
    from transformers import AutoModel, AutoTokenizer

    checkpoint_path = Path(checkpoint_path)
    for sub in ("llm", "tokenizer"):
        if not (checkpoint_path / sub).is_dir():
            raise FileNotFoundError(f"{checkpoint_path} is not a released HART checkpoint: {sub}/ is missing")
    vae = load_tokenizer_folder(checkpoint_path / "tokenizer").eval()
    transformer, num_steps = convert_transformer_folder(checkpoint_path / "llm", vae, use_ema=use_ema)
    pipe = HARTPipeline(
        tokenizer=AutoTokenizer.from_pretrained(text_encoder_path),
        text_encoder=AutoModel.from_pretrained(text_encoder_path).eval(),
        transformer=transformer,
        vae=vae,
        scheduler=HARTResidualDiffusionScheduler(),
        system_prompt=HART_SYSTEM_PROMPT,
        default_num_inference_steps=num_steps,
    )
    if dtype is not None:
        pipe.to(dtype)
    return pipe


def _check_output_path(output_path: Path, sources, overwrite: bool) -> None:
    resolved = output_path.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise ValueError(f"--output_path {output_path} overlaps the input folder {source}; choose a new folder")
    if output_path.exists() and any(output_path.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_path} exists and is not empty; pass --overwrite to replace its files")


def convert(
    checkpoint_path: str,
    text_encoder_path: str,
    output_path: str,
    use_ema: bool = True,
    dtype: str = "fp32",
    overwrite: bool = False,
    push_to_hub: bool = False,
    repo_id: Optional[str] = None,
) -> HARTPipeline:
    """Convert and save (optionally push) a released checkpoint; returns the pipeline."""
    output = Path(output_path)
    _check_output_path(output, [checkpoint_path, text_encoder_path], overwrite)
    if push_to_hub and not repo_id:
        raise ValueError("--push_to_hub needs --repo_id")
    pipe = build_pipeline_from_original(checkpoint_path, text_encoder_path, use_ema=use_ema, dtype=DTYPES[dtype])
    pipe.save_pretrained(output, safe_serialization=True)
    (output / "pipeline.py").write_text(CUSTOM_PIPELINE_FILE)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(output), repo_id=repo_id)
    return pipe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True, help="released folder holding llm/ and tokenizer/")
    parser.add_argument("--text_encoder_path", required=True, help="Qwen2 model + tokenizer folder")
    parser.add_argument("--output_path", required=True, help="new folder for the diffusers pipeline")
    parser.add_argument("--use_ema", dest="use_ema", action="store_true", default=True, help="EMA weights (default)")
    parser.add_argument("--no_use_ema", dest="use_ema", action="store_false", help="the plain (non-EMA) weights")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output folder")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--repo_id", default=None)
    args = parser.parse_args(argv)
    convert(
        args.checkpoint_path, args.text_encoder_path, args.output_path, args.use_ema, args.dtype,
        args.overwrite, args.push_to_hub, args.repo_id,
    )  # fmt: skip
    print(f"Saved the diffusers pipeline to {args.output_path}")


if __name__ == "__main__":
    main()
