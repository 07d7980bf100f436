"""The HART transformer's training step as one module's forward, for DDP / FSDP to wrap.

A trainer wraps `HARTTransformerTrainingModule` (`accelerator.prepare(module, optimizer)`). DDP all-reduces the
gradients of the wrapped module's parameters in the backward of a step that ran through the wrapper's forward, so
the whole step lives in `forward`: the transformer's forward, the residual condition and the diffusion head
(submodules of the wrapped module, called from inside its forward, are covered). Calling any of them from outside the
wrapper, or through `wrapper.module`, would train without the all-reduce, and each process would drift on its own.

The step never reads the device from the host: the mask ratio, which fixes the sequence length, is a host draw;
every other draw happens on the device; sizes are known on the host; see `hart_training_step` for the rest.
"""

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from diffusers.utils import BaseOutput

from ..models import HARTAutoEncoder, HARTTransformer2DModel
from ..pipelines.hart.pipeline_hart import TextEncoderInputs, context_from_text_encoder, text_position_ids
from ..pipelines.hart.sampling import GeneratorArg
from ..schedulers import HARTResidualDiffusionScheduler
from .losses import (
    MIN_KEPT_LAST_SCALE_TOKENS,
    TrainingRandomness,
    check_last_scale_size,
    hart_training_step,
    kept_positions_from_orders,
    sample_cond_drop,
    sample_mask_ratio,
    token_cross_entropy,
    token_targets,
)


@dataclass
class HARTTransformerTrainingLosses(BaseOutput):
    """
    Args:
        loss (`torch.Tensor` of shape `()`): What to backpropagate:
            `token_loss + diffusion_loss_weight * diffusion_loss`.
        token_loss (`torch.Tensor` of shape `()`): Next-scale token cross-entropy over every scale (the last one at
            its kept positions).
        diffusion_loss (`torch.Tensor` of shape `()`): The residual-diffusion loss (improved-DDPM epsilon MSE plus the
            variational bound, `scheduler.training_losses`), averaged over the noised residual tokens.
        token_accuracy (`torch.Tensor` of shape `()`): Argmax accuracy of the token logits, detached, for logging.
    """

    # defaults, as diffusers' outputs have, so that accelerate can rebuild the output from a dict (mixed precision
    # converts a forward's outputs to float32 that way)
    loss: torch.Tensor = None
    token_loss: torch.Tensor = None
    diffusion_loss: torch.Tensor = None
    token_accuracy: torch.Tensor = None


def _mask_ratio_generator(generator: GeneratorArg) -> Optional[torch.Generator]:
    """The CPU generator the step's mask ratio comes from (`None`: torch's default CPU generator).

    * A CPU generator draws it itself.
    * A generator on an accelerator cannot (reading its numbers would sync), but its state, a seed and an offset, lives
      on the host and moves on with every draw: a CPU generator seeded from it keeps the step reproducible from
      `generator` alone.
    * One generator per sample cannot give a per-batch number: torch's default CPU generator does, which
      `torch.manual_seed` and accelerate's `set_seed` seed (alike on every process unless asked otherwise).
    """
    if generator is None or isinstance(generator, (list, tuple)):
        return None
    if generator.device.type == "cpu":
        return generator
    state = generator.get_state().numpy().tobytes()
    seed = int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") >> 1
    return torch.Generator().manual_seed(seed)


def _check_generator_device(generator: GeneratorArg, device: torch.device) -> None:
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    for g in generators:
        if g is None:
            continue
        # "cuda" and "cuda:0" are one device: compare the devices tensors actually land on
        if torch.empty(0, device=g.device).device != device:
            raise ValueError(
                f"The generator is on {g.device} but the batch is on {device}: draws made elsewhere would be copied "
                f"to the device in every step, which waits for it. Pass `torch.Generator(device={str(device)!r})`."
            )


class HARTTransformerTrainingModule(nn.Module):
    r"""
    One HART transformer training step, from images and encoded prompts to its losses.

    The frozen tokenizer (VAE) turns the images into the per-scale indices, the teacher-forcing input and the
    last-scale residual target; the transformer is trained on them with the original's step (see
    `diffusers_hart.training.losses`). Wrap this module as a whole (`accelerator.prepare`), not the transformer.

    Args:
        transformer ([`HARTTransformer2DModel`]): The model to train (LoRA adapters included, if any were added).
        vae ([`HARTAutoEncoder`]): The tokenizer. It is frozen here (`requires_grad_(False)`) and stays in eval mode;
            as a submodule it moves with `.to(device)`.
        scheduler ([`HARTResidualDiffusionScheduler`]): The diffusion of the residual head's loss.
        label_smoothing (`float`, defaults to 0.0): Label smoothing of the token cross-entropy.
        original_cond_drop (`bool`, defaults to False): Drop the context of about 54% of the rows, as the original's
            `randn < cond_drop_rate` does, instead of `transformer.config.cond_drop_rate` of them (`sample_cond_drop`).
        diffusion_loss_weight (`float`, defaults to 1.0): Weight of the diffusion loss in `loss`.
    """

    def __init__(
        self,
        transformer: HARTTransformer2DModel,
        vae: HARTAutoEncoder,
        scheduler: HARTResidualDiffusionScheduler,
        label_smoothing: float = 0.0,
        original_cond_drop: bool = False,
        diffusion_loss_weight: float = 1.0,
    ):
        super().__init__()
        if tuple(vae.config.patch_nums) != tuple(transformer.config.patch_nums):
            raise ValueError(
                f"The VAE tokenizes to patch_nums {tuple(vae.config.patch_nums)} but the transformer predicts "
                f"{tuple(transformer.config.patch_nums)}; pass a matching pair."
            )
        check_last_scale_size(transformer.config.patch_nums[-1] ** 2)
        self.transformer = transformer
        self.vae = vae.requires_grad_(False).eval()
        self.scheduler = scheduler
        self.label_smoothing = label_smoothing
        self.original_cond_drop = original_cond_drop
        self.diffusion_loss_weight = diffusion_loss_weight

    def train(self, mode: bool = True) -> "HARTTransformerTrainingModule":
        super().train(mode)
        self.vae.eval()  # frozen: no dropout whatever the trainer's mode
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        generator: GeneratorArg = None,
        mask_ratio: Optional[float] = None,
    ) -> HARTTransformerTrainingLosses:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): Images in [-1, 1], H and W the VAE's input size
                for the last patch_num (16 x the last patch_num for the released tokenizer).
            prompt_embeds (`torch.Tensor` of shape `(B, context_length, context_dim)`), prompt_attention_mask
                (`torch.BoolTensor` of shape `(B, context_length)`): As `HARTPipeline.encode_prompt` returns them.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): Source of the step's draws, on the
                batch's device: one generator for the batch, or one per sample (a sample's draws then depend on its
                own generator alone, e.g. to split a batch over processes and draw what it draws whole). `None` uses
                the global RNGs. See `_mask_ratio_generator` for the one host draw.
            mask_ratio (`float`, *optional*): Share of last-scale tokens to drop (at least 32 always stay); drawn from
                the original's truncated normal when not given.

        Returns:
            [`HARTTransformerTrainingLosses`]
        """
        device = pixel_values.device
        _check_generator_device(generator, device)
        config = self.transformer.config
        B = pixel_values.shape[0]

        # 1. tokenize with the frozen VAE: per-scale indices, teacher-forcing input, last-scale residual target
        with torch.no_grad():
            latent = self.vae.encode(pixel_values.to(self.vae.dtype)).latent
            scale_indices, last_scale_target = self.vae.latent_to_indices(latent)
            teacher_forcing_input = self.vae.teacher_forcing_input(scale_indices)
            codebook = self.vae.quantize.codebook()
        dtype = self.transformer.dtype

        # 2. the sequence's random choices: the ratio on the host, the rest on the device
        randomness = TrainingRandomness(generator, B, device)
        num_last = last_scale_target.shape[1]
        orders = randomness.permutations(num_last)
        if mask_ratio is None:
            mask_ratio = sample_mask_ratio(_mask_ratio_generator(generator))
        kept_positions = kept_positions_from_orders(orders, mask_ratio, MIN_KEPT_LAST_SCALE_TOKENS)
        cond_dropped = sample_cond_drop(B, config.cond_drop_rate, generator, device, self.original_cond_drop)

        # 3. the step
        out = hart_training_step(
            self.transformer,
            self.scheduler,
            codebook,
            prompt_embeds,
            prompt_attention_mask,
            text_position_ids(prompt_attention_mask),
            teacher_forcing_input.to(dtype),
            last_scale_target.to(dtype),
            kept_positions,
            cond_dropped,
            randomness,
            last_scale_indices=scale_indices[-1].gather(1, kept_positions),
        )

        # 4. losses
        targets = token_targets(scale_indices, kept_positions)
        token_loss = token_cross_entropy(out.logits, targets, self.label_smoothing)
        token_accuracy = (out.logits.detach().argmax(dim=-1) == targets).float().mean()
        return HARTTransformerTrainingLosses(
            loss=token_loss + self.diffusion_loss_weight * out.diffusion_loss,
            token_loss=token_loss,
            diffusion_loss=out.diffusion_loss,
            token_accuracy=token_accuracy,
        )


class HARTTextEncoderTrainingModule(nn.Module):
    r"""
    The transformer's training step with the text encoder trained along with it: the prompts are encoded inside
    `forward`, so the wrapper (DDP) reduces the text encoder's gradients with the transformer's. Wrap this module as
    a whole.

    Args:
        step ([`HARTTransformerTrainingModule`]): The transformer's step, which receives the context.
        text_encoder (`transformers.PreTrainedModel`): The text encoder to train.
    """

    def __init__(self, step: HARTTransformerTrainingModule, text_encoder: nn.Module):
        super().__init__()
        self.step = step
        self.text_encoder = text_encoder

    def forward(
        self,
        pixel_values: torch.Tensor,
        text_input_ids: torch.LongTensor,
        text_attention_mask: torch.BoolTensor,
        prompt_attention_mask: torch.BoolTensor,
        generator: GeneratorArg = None,
        mask_ratio: Optional[float] = None,
    ) -> HARTTransformerTrainingLosses:
        """The three text tensors are `HARTPipeline.text_encoder_inputs(...)`'s fields, in order; the rest is
        `HARTTransformerTrainingModule.forward`'s."""
        inputs = TextEncoderInputs(text_input_ids, text_attention_mask, prompt_attention_mask)
        prompt_embeds = context_from_text_encoder(self.text_encoder, inputs)
        return self.step(pixel_values, prompt_embeds, prompt_attention_mask, generator, mask_ratio)
