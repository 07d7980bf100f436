"""Convert a released HART checkpoint into a diffusers folder that `HARTPipeline.from_pretrained` loads.

Released layout (e.g. `hart-0.7b-1024px/`):

    llm/config.json                 HARTForT2IConfig
    llm/model.safetensors           weights (or pytorch_model.bin)
    llm/ema_model.bin               EMA weights (the ones the original samples with)
    tokenizer/config.json           HARTAutoEncoderWithDisc config
    tokenizer/model.safetensors     `vae.*` (kept) and `disc.*` (discriminator, dropped)

plus a Qwen2 text encoder (model + tokenizer: a folder, or a Hub repo id). `convert` saves the diffusers folder (the
`hart-convert` command, `diffusers_hart.cli.convert`); `from_original` builds the pipeline without saving it.
"""

import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..models import HARTAutoEncoder, HARTTransformer2DModel
from ..pipelines import HARTPipeline
from ..schedulers import HARTResidualDiffusionScheduler
from ..utils import DTYPES, existing_folder, names_local_path
from .state_dict_utils import find_checkpoint_file, load_checkpoint_file, load_config_file
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

# Written into the converted folder so that plain diffusers can load it with
# `DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)`.
CUSTOM_PIPELINE_FILE = '''"""Loads this folder with plain diffusers: requires `pip install diffusers_hart`."""

from diffusers_hart import HARTPipeline

__all__ = ["HARTPipeline"]
'''


def convert_transformer_folder(llm_folder: Union[str, os.PathLike], vae: HARTAutoEncoder, use_ema: bool = True):
    """Build `(HARTTransformer2DModel, num_inference_steps)` from a released `llm/` folder.

    Its weights are the EMA ones (`ema_model.bin`) or the plain ones (`model.safetensors` / `pytorch_model.bin`).
    """
    llm_folder = Path(llm_folder)
    original_config = load_config_file(llm_folder / "config.json")
    config, num_steps = convert_transformer_config(original_config, dict(vae.config))
    model = HARTTransformer2DModel(**config)
    candidates = ["ema_model.bin"] if use_ema else ["model.safetensors", "pytorch_model.bin"]
    weights_file = find_checkpoint_file(llm_folder, candidates)
    weights = load_checkpoint_file(weights_file)
    state_dict = convert_transformer_state_dict(weights, config, checkpoint=str(weights_file))
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), num_steps


def from_original(
    checkpoint_path: Union[str, os.PathLike],
    text_encoder_path: Union[str, os.PathLike],
    use_ema: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> HARTPipeline:
    """A ready `HARTPipeline` straight from the original release, without writing a diffusers folder.

    Args:
        checkpoint_path (`str` or `os.PathLike`): The released folder holding `llm/` and `tokenizer/`.
        text_encoder_path (`str` or `os.PathLike`): The Qwen2 text encoder (model + tokenizer): a folder, or a Hub
            repo id.
        use_ema (`bool`, defaults to `True`): The EMA weights (`llm/ema_model.bin`), which the original samples
            with; `False` takes the plain ones.
        dtype (`torch.dtype`, *optional*): Cast every component to it; `None` keeps the checkpoint's float32.

    Raises:
        `FileNotFoundError("no such folder: PATH")` for a missing `checkpoint_path`, or a `text_encoder_path` that
        names a local path (see `names_local_path`) but does not exist, before anything is loaded. `ValueError`
        naming a file that cannot be read, `CheckpointKeyError` naming a weight missing from its file.
    """
    from transformers import AutoModel, AutoTokenizer

    checkpoint_path = existing_folder(checkpoint_path)
    if names_local_path(text_encoder_path):
        text_encoder_path = existing_folder(text_encoder_path)
    for sub in ("llm", "tokenizer"):
        if not (checkpoint_path / sub).is_dir():
            raise FileNotFoundError(f"{checkpoint_path} is not a released HART checkpoint: {sub}/ is missing")
    vae = load_tokenizer_folder(checkpoint_path / "tokenizer").eval()
    transformer, num_steps = convert_transformer_folder(checkpoint_path / "llm", vae, use_ema=use_ema)
    try:
        tokenizer = AutoTokenizer.from_pretrained(text_encoder_path)
        text_encoder = AutoModel.from_pretrained(text_encoder_path).eval()
    except OSError as error:  # transformers' message (e.g. offline and not cached) does not say which model
        raise OSError(f"cannot load the text encoder {text_encoder_path}: {error}") from error
    pipe = HARTPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
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
        source = Path(source).expanduser().resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise ValueError(f"--output_path {output_path} overlaps the input folder {source}; choose a new folder")
    if output_path.exists() and any(output_path.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_path} exists and is not empty; pass --overwrite to replace its files")


def _set_default_permissions(output: Path, pipe: HARTPipeline) -> None:
    """Give the files `convert` wrote the mode a plain file creation gets under the current umask (0o666 & ~umask).

    safetensors writes weight files 0600 while the json files next to them follow the umask (usually 0644), so a
    converted folder could not be shared or served as it is.
    """
    umask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(umask)
    written = [output / "model_index.json", output / "pipeline.py"]
    written += [path for name in pipe.components for path in (output / name).rglob("*") if path.is_file()]
    for path in written:
        path.chmod(0o666 & ~umask)


def convert(
    checkpoint_path: Union[str, os.PathLike],
    text_encoder_path: Union[str, os.PathLike],
    output_path: Union[str, os.PathLike],
    use_ema: bool = True,
    dtype: str = "fp32",
    overwrite: bool = False,
    push_to_hub: bool = False,
    repo_id: Optional[str] = None,
) -> HARTPipeline:
    """Convert and save (optionally push) a released checkpoint; returns the pipeline.

    `dtype` is a key of `DTYPES`. The saved files are readable as the umask allows, like any new file. Raises before
    loading anything if the output folder overlaps an input or is not empty (without `overwrite`), if `push_to_hub`
    lacks a `repo_id`, or if an input folder is missing (see `from_original`).
    """
    output = Path(output_path)
    _check_output_path(output, [checkpoint_path, text_encoder_path], overwrite)
    if push_to_hub and not repo_id:
        raise ValueError("--push_to_hub needs --repo_id")
    pipe = from_original(checkpoint_path, text_encoder_path, use_ema=use_ema, dtype=DTYPES[dtype])
    pipe.save_pretrained(output, safe_serialization=True)
    (output / "pipeline.py").write_text(CUSTOM_PIPELINE_FILE)
    _set_default_permissions(output, pipe)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(output), repo_id=repo_id)
    return pipe
