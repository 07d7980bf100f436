"""`hart-train-transformer`: train or fine-tune the HART transformer on image-caption pairs.

Components come from a HARTPipeline folder (`--pretrained_model_name_or_path`) or from parts: a text encoder folder
(`--text_encoder_path`, with `tokenizer/` and `text_encoder/`), a tokenizer (`--vae_path`, e.g. the output of
`hart-train-tokenizer`) and a fresh transformer (`--transformer_config`); the last two also replace the pipeline
folder's. The tokenizer stays frozen, and so does the text encoder unless `--train_text_encoder` trains it with the
transformer (`HARTTextEncoderTrainingModule`); the loss is `HARTTransformerTrainingModule`'s. The result
is a HARTPipeline folder (`HARTPipeline.from_pretrained(output_dir)`, EMA weights when `--use_ema`), or with
`--lora_rank` the LoRA adapter alone (`pytorch_lora_weights.safetensors`).
"""

import json
import logging
from pathlib import Path
from typing import Callable, List, Optional

import torch

from ..models import HARTAutoEncoder, HARTTransformer2DModel
from ..pipelines.hart import HARTPipeline
from ..pipelines.hart.pipeline_hart import tokenize_for_text_encoder
from ..schedulers import HARTResidualDiffusionScheduler
from .data import collate_image_text, write_metadata
from .text_context import TextContextEncoder
from .trainer import Objective, Trainer, build_optimizer, build_train_dataset, create_accelerator, weight_dtype
from .transformer_step import HARTTextEncoderTrainingModule, HARTTransformerTrainingModule

logger = logging.getLogger(__name__)


def _read_json(path: str, flag: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except ValueError as error:
        raise ValueError(f"{flag} {path}: not JSON ({error})") from None


def _text_encoder_parts(path: str):
    """Tokenizer and text encoder of a folder holding `tokenizer/` and `text_encoder/` (a pipeline folder works)."""
    from transformers import AutoModel, AutoTokenizer

    for sub in ("tokenizer", "text_encoder"):
        if not (Path(path) / sub).is_dir():
            raise ValueError(f"--text_encoder_path {path}: no {sub}/ subfolder")
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    return tokenizer, AutoModel.from_pretrained(path, subfolder="text_encoder")


def load_pipeline(args) -> HARTPipeline:
    """The pipeline whose transformer is trained, assembled as the module docstring says."""
    if (args.pretrained_model_name_or_path is None) == (args.text_encoder_path is None):
        raise ValueError(
            "pass exactly one of --pretrained_model_name_or_path (a HARTPipeline folder) and --text_encoder_path "
            "(with --vae_path and --transformer_config)"
        )
    if args.pretrained_model_name_or_path is not None:
        pipeline = HARTPipeline.from_pretrained(args.pretrained_model_name_or_path)
        parts = dict(pipeline.components)
        system_prompt = pipeline.config.system_prompt
    else:
        if args.vae_path is None or args.transformer_config is None:
            raise ValueError("--text_encoder_path needs --vae_path (a HARTAutoEncoder folder) and --transformer_config")
        tokenizer, text_encoder = _text_encoder_parts(args.text_encoder_path)
        parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, scheduler=HARTResidualDiffusionScheduler())
        system_prompt = ""
    if args.vae_path is not None:
        parts["vae"] = HARTAutoEncoder.from_pretrained(args.vae_path)
    if args.transformer_config is not None:
        parts["transformer"] = HARTTransformer2DModel.from_config(
            _read_json(args.transformer_config, "--transformer_config")
        )
    if args.system_prompt is not None:
        system_prompt = args.system_prompt
    check_components(parts["transformer"], parts["vae"], parts["text_encoder"])
    return HARTPipeline(**parts, system_prompt=system_prompt)


def check_components(transformer, vae, text_encoder) -> None:
    """The transformer must speak the tokenizer's codes and read the text encoder's states."""
    t, v = transformer.config, vae.config
    pairs = [
        ("latent_channels", t.latent_channels, "z_channels", v.z_channels),
        ("vocab_size", t.vocab_size, "vocab_size", v.vocab_size),
        ("patch_nums", tuple(t.patch_nums), "patch_nums", tuple(v.patch_nums)),
    ]
    for t_key, t_value, v_key, v_value in pairs:
        if t_value != v_value:
            raise ValueError(
                f"the transformer's {t_key} {t_value} differs from the tokenizer's {v_key} {v_value}; give the "
                f"transformer config {t_key}={v_value}"
            )
    hidden_size = text_encoder.config.hidden_size
    if t.context_dim != hidden_size:
        raise ValueError(
            f"the transformer's context_dim {t.context_dim} differs from the text encoder's hidden_size "
            f"{hidden_size}; give the transformer config context_dim={hidden_size}"
        )


def check_resolution(pipeline: HARTPipeline, resolution: Optional[int]) -> int:
    """`--resolution`, defaulting to and checked against the model's only size."""
    side = pipeline.supported_size[0]
    if resolution is not None and resolution != side:
        raise ValueError(f"--resolution {resolution}: this model makes {side}x{side} images; pass --resolution {side}")
    return side


def check_text_encoder_training(args) -> None:
    """What `--train_text_encoder` cannot be combined with, before any model is loaded."""
    if not args.train_text_encoder:
        if args.text_encoder_learning_rate is not None:
            raise ValueError("--text_encoder_learning_rate needs --train_text_encoder")
        return
    if args.cache_text_context is not None:
        raise ValueError(
            "--train_text_encoder changes the text context at every step, so it cannot be cached: drop "
            "--cache_text_context"
        )
    if args.lora_rank is not None:
        raise ValueError("--train_text_encoder trains the whole text encoder; it does not combine with --lora_rank")


def require_peft() -> None:
    """Fail before any model is loaded when `--lora_rank` cannot work."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError("--lora_rank needs the peft package: pip install peft") from None


def add_lora(transformer: HARTTransformer2DModel, args) -> List[torch.nn.Parameter]:
    """Freeze the transformer and add a LoRA adapter of `--lora_rank`; returns its parameters."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha or args.lora_rank,
        init_lora_weights="gaussian",
        target_modules=[name.strip() for name in args.lora_target_modules.split(",") if name.strip()],
    )
    transformer.add_adapter(config)
    return [p for p in transformer.parameters() if p.requires_grad]


class TextInputsCollate:
    """`collate_image_text` plus `"text_inputs"`: the captions tokenized for a trained text encoder
    (`HARTPipeline.text_encoder_inputs`), so that the loader's workers tokenize them, not the training loop."""

    def __init__(self, tokenizer, system_prompt: str, context_length: int):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.context_length = context_length

    def __call__(self, items: List[dict]) -> dict:
        batch = collate_image_text(items)
        batch["text_inputs"] = tokenize_for_text_encoder(
            self.tokenizer, batch["texts"], self.context_length, self.system_prompt
        )
        return batch


class PromptValidation:
    """Images of `--validation_prompts` (seeded by `--seed`) saved as `output_dir/validation/step-N/<i>.png`, with
    the prompts in that folder's `metadata.jsonl` (an imagefolder: `hart-eval-shapes` judges it as it is). With
    `save_model` (`--validation_save_pipeline`) the model as validated is saved there too, in `pipeline/`: a run
    can then be taken from the step where its validation was best, not only from its end."""

    def __init__(
        self,
        pipeline: HARTPipeline,
        trained: torch.nn.Module,
        prompts: List[str],
        seed: int,
        guidance_scale: float,
        output_dir,
        save_model: Optional[Callable[[Path], None]] = None,
    ):
        self.pipeline = pipeline
        self.trained = trained
        self.prompts = prompts
        self.seed = seed
        self.guidance_scale = guidance_scale
        self.output_dir = Path(output_dir)
        self.save_model = save_model

    def __call__(self, global_step: int) -> None:
        self.trained.eval()
        self.pipeline.set_progress_bar_config(disable=True)
        images = self.pipeline(
            self.prompts, guidance_scale=self.guidance_scale, generator=torch.Generator().manual_seed(self.seed)
        ).images
        self.trained.train()
        folder = self.output_dir / "validation" / f"step-{global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"{i:02d}.png" for i in range(len(images))]
        for name, image in zip(names, images):
            image.save(folder / name)
        write_metadata(folder, list(zip(names, self.prompts)))
        if self.save_model is not None:
            self.save_model(folder / "pipeline")
        logger.info(f"step {global_step}: {len(images)} validation image(s) in {folder}")


def main(args) -> HARTPipeline:
    """Train the transformer as `args` (the flags of `hart-train-transformer`) say; returns the pipeline."""
    check_text_encoder_training(args)
    if args.lora_rank is not None:
        require_peft()
    accelerator = create_accelerator(args)
    pipeline = load_pipeline(args)
    args.resolution = check_resolution(pipeline, args.resolution)
    transformer, vae, text_encoder = pipeline.transformer, pipeline.vae, pipeline.text_encoder

    # 1. the text encoder on the training device, frozen (its context optionally cached) or trained in float32 (a
    # folder saved in half precision loads as such); the VAE moves with the training module
    vae.to(accelerator.device)
    if args.train_text_encoder:
        text_encoder.requires_grad_(True).float().train().to(accelerator.device)
        if args.gradient_checkpointing:
            text_encoder.gradient_checkpointing_enable()
    else:
        text_encoder.requires_grad_(False).eval().to(accelerator.device)
        text_context = TextContextEncoder(
            pipeline, accelerator.device, args.cache_text_context, autocast_dtype=weight_dtype(accelerator)
        )

    # 2. what trains: the whole transformer, or a LoRA adapter, and the text encoder if asked
    transformer.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.lora_rank is not None:
        parameters = add_lora(transformer, args)
    else:
        parameters = [p for p in transformer.parameters() if p.requires_grad]
    module = HARTTransformerTrainingModule(
        transformer,
        vae,
        pipeline.scheduler,
        label_smoothing=args.label_smoothing,
        original_cond_drop=args.original_cond_drop,
        diffusion_loss_weight=args.diffusion_loss_weight,
    )
    if args.train_text_encoder:
        module = HARTTextEncoderTrainingModule(module, text_encoder)
        text_encoder_learning_rate = args.text_encoder_learning_rate or args.learning_rate
        parameters = [
            {"params": parameters},
            {"params": list(text_encoder.parameters()), "lr": text_encoder_learning_rate},
        ]
        collate_fn = TextInputsCollate(
            pipeline.tokenizer, pipeline.config.system_prompt, transformer.config.context_length
        )

        def transformer_step(module, batch, global_step, outputs):
            return module(batch["pixel_values"], *batch["text_inputs"])

    else:
        collate_fn = collate_image_text

        def transformer_step(module, batch, global_step, outputs):
            prompt_embeds, prompt_attention_mask = text_context(batch["texts"])
            return module(batch["pixel_values"], prompt_embeds, prompt_attention_mask)

    def save_model(folder):
        if args.lora_rank is not None:
            # folder/pytorch_lora_weights.safetensors, read back by
            # transformer.load_lora_adapter(folder, prefix=None, use_safetensors=True)
            transformer.save_lora_adapter(folder)
        else:
            pipeline.save_pretrained(folder)

    validate = None
    if args.validation_prompts:
        validate = PromptValidation(
            pipeline, module, args.validation_prompts, args.seed, args.validation_guidance_scale, args.output_dir,
            save_model=save_model if args.validation_save_pipeline else None,
        )  # fmt: skip

    trainer = Trainer(
        args,
        accelerator,
        [Objective(module, build_optimizer(parameters, args), transformer_step)],
        build_train_dataset(args, captions_required=True),
        trained_model=module,
        validate=validate,
        save_final=lambda: save_model(args.output_dir),
        collate_fn=collate_fn,
    )
    trainer.train()
    return pipeline
