"""`hart-train-tokenizer`: train or fine-tune the HART tokenizer (`HARTAutoEncoder`) on images.

Captions are not needed: a folder of images works, with or without `metadata.jsonl`. The loss is
`HARTTokenizerTrainingModule`'s (both decodes of the hybrid scheme, VQ loss, an optional patch-GAN switched on at
`--discriminator_start_step`); held-out images report the PSNR of both decodes at every validation. The result is a
diffusers folder (`HARTAutoEncoder.from_pretrained(output_dir)`), EMA weights when `--use_ema`, ready for
`hart-train-transformer --vae_path`.
"""

import json
import logging
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ..models.autoencoders import HARTAutoEncoder
from .data import collate_image_text, tensor_to_image
from .tokenizer_step import (
    HARTTokenizerTrainingModule,
    HingeDiscriminatorLoss,
    PatchGANDiscriminator,
    frozen,
    inference_reconstructions,
    psnr,
)
from .trainer import Objective, Trainer, build_optimizer, build_train_dataset, create_accelerator, image_folder_dataset

logger = logging.getLogger(__name__)

# Held-out images shown in each validation's reconstruction grid.
_GRID_IMAGES = 8


def load_vae(args) -> HARTAutoEncoder:
    """The tokenizer to train: `--pretrained_vae_path` (continue one) or `--vae_config` (fresh weights)."""
    if (args.pretrained_vae_path is None) == (args.vae_config is None):
        raise ValueError(
            "pass exactly one of --pretrained_vae_path (a HARTAutoEncoder folder to continue) and --vae_config "
            "(a JSON config for fresh weights)"
        )
    if args.pretrained_vae_path is not None:
        return HARTAutoEncoder.from_pretrained(args.pretrained_vae_path)
    try:
        config = json.loads(Path(args.vae_config).read_text())
    except ValueError as error:
        raise ValueError(f"--vae_config {args.vae_config}: not JSON ({error})") from None
    return HARTAutoEncoder.from_config(config)


def check_resolution(vae: HARTAutoEncoder, resolution: int) -> None:
    """The quantizer's last scale must cover the whole latent: `resolution = patch_nums[-1] * 2**(levels - 1)`."""
    factor = 2 ** (len(vae.config.ch_mult) - 1)
    expected = vae.config.patch_nums[-1] * factor
    if resolution != expected:
        raise ValueError(
            f"--resolution {resolution} does not fit this tokenizer: its last patch_num {vae.config.patch_nums[-1]} "
            f"times its downsampling {factor} is {expected}; pass --resolution {expected}"
        )


def freeze_unused_quant_resi(vae: HARTAutoEncoder) -> None:
    """Freeze the quantizer's `Phi` convs that no stage uses (e.g. 4 shared convs over 3 scales): they never get a
    gradient, and DDP waits for a gradient of every trainable parameter. Found by running the quantizer once on a
    zero latent with hooks that record which convs it calls."""
    called = set()
    hooks = [conv.register_forward_hook(lambda m, i, o: called.add(m)) for conv in vae.quantize.quant_resi]
    side, channels = vae.config.patch_nums[-1], vae.config.z_channels
    try:
        with torch.no_grad():
            vae.quantize(torch.zeros(1, channels, side, side, dtype=vae.dtype, device=vae.device))
    finally:
        for hook in hooks:
            hook.remove()
    for index, conv in enumerate(vae.quantize.quant_resi):
        if conv not in called and any(p.requires_grad for p in conv.parameters()):
            logger.info(f"quant_resi.{index} is used by no scale of patch_nums {vae.config.patch_nums}: frozen")
            conv.requires_grad_(False)


def split_held_out(args, dataset: Dataset) -> Tuple[Dataset, Optional[Dataset]]:
    """(training images, held-out images): `--validation_images`, or `--num_validation_images` taken out of the
    training set (a seeded choice, the same on every process and every resume), or none."""
    if args.validation_images is not None:
        held_out = image_folder_dataset(
            args.validation_images, args.resolution, args.on_bad_image, captions_required=False
        )
        return dataset, held_out
    count = args.num_validation_images
    if not count:
        return dataset, None
    if count >= len(dataset):
        raise ValueError(f"--num_validation_images {count} leaves no training image of {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
    return Subset(dataset, sorted(order[count:])), Subset(dataset, sorted(order[:count]))


class HeldOutValidation:
    """PSNR of both decodes on held-out images, through the inference path; a grid (originals, continuous,
    discrete) saved as `output_dir/validation/step-N/reconstructions.png`."""

    def __init__(self, vae: HARTAutoEncoder, images: Dataset, batch_size: int, device, output_dir):
        self.vae = vae
        self.loader = DataLoader(images, batch_size=batch_size, collate_fn=collate_image_text)
        self.device = device
        self.output_dir = Path(output_dir)

    def __call__(self, global_step: int) -> dict:
        self.vae.eval()
        scores, scores_discrete, grid = [], [], []
        for batch in self.loader:
            pixel_values = batch["pixel_values"].to(self.device)
            continuous, discrete = inference_reconstructions(self.vae, pixel_values)
            scores += psnr(continuous, pixel_values).tolist()
            scores_discrete += psnr(discrete, pixel_values).tolist()
            if sum(len(g[0]) for g in grid) < _GRID_IMAGES:
                grid.append((pixel_values, continuous, discrete))
        self.vae.train()
        folder = self.output_dir / "validation" / f"step-{global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = [torch.cat([g[k] for g in grid])[:_GRID_IMAGES] for k in range(3)]
        pils = [tensor_to_image(row) for row in rows]
        canvas = Image.new("RGB", (pils[0].width, sum(p.height for p in pils)))
        for i, pil in enumerate(pils):
            canvas.paste(pil, (0, i * pils[0].height))
        canvas.save(folder / "reconstructions.png")
        metrics = {"psnr": float(np.mean(scores)), "psnr_discrete": float(np.mean(scores_discrete))}
        logger.info(
            f"step {global_step}: held-out PSNR {metrics['psnr']:.2f} dB, discrete {metrics['psnr_discrete']:.2f} dB"
        )
        return metrics


def tokenizer_objectives(args, vae: HARTAutoEncoder) -> list:
    """The tokenizer's objective, and the discriminator's when `--discriminator_start_step` is set."""
    module = HARTTokenizerTrainingModule(
        vae, vq_weight=args.vq_weight, discrete_weight=args.discrete_weight, adversarial_weight=args.adversarial_weight
    )
    vae_parameters = [p for p in vae.parameters() if p.requires_grad]
    start = args.discriminator_start_step
    discriminator = None
    if start is not None:
        if args.resolution >> args.discriminator_layers < 3:  # the two last 4x4 convs need a 3x3 map
            raise ValueError(
                f"--resolution {args.resolution} is too small for {args.discriminator_layers} discriminator layers; "
                "pass a smaller --discriminator_layers"
            )
        discriminator = PatchGANDiscriminator(
            base_channels=args.discriminator_channels, num_layers=args.discriminator_layers
        )

    def tokenizer_step(module, batch, global_step, outputs):
        if discriminator is None or global_step < start:
            return module(batch["pixel_values"])
        # the generator's loss goes through the discriminator without training it (its step comes next)
        with frozen(discriminator):
            return module(batch["pixel_values"], discriminator=discriminator)

    objectives = [Objective(module, build_optimizer(vae_parameters, args), tokenizer_step)]
    if discriminator is not None:
        objectives.append(
            Objective(
                HingeDiscriminatorLoss(discriminator),
                build_optimizer(list(discriminator.parameters()), args, args.discriminator_learning_rate),
                lambda module, batch, step, outputs: module(batch["pixel_values"], outputs["main"].reconstructions),
                name="discriminator",
                start_step=start,
            )
        )
    return objectives


def main(args) -> HARTAutoEncoder:
    """Train the tokenizer as `args` (the flags of `hart-train-tokenizer`) say; returns the trained VAE."""
    accelerator = create_accelerator(args)
    vae = load_vae(args)
    check_resolution(vae, args.resolution)
    freeze_unused_quant_resi(vae)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()

    train_set, held_out = split_held_out(args, build_train_dataset(args, captions_required=False))
    validate = None
    if held_out is not None:
        validate = HeldOutValidation(vae, held_out, args.train_batch_size, accelerator.device, args.output_dir)
    trainer = Trainer(
        args,
        accelerator,
        tokenizer_objectives(args, vae),
        train_set,
        trained_model=vae,
        validate=validate,
        save_final=lambda: vae.save_pretrained(args.output_dir),
    )
    trainer.train()
    return vae
