"""One training step of the HART tokenizer (`HARTAutoEncoder`), as the forward of a module that DDP can wrap.

HART's tokenizer is hybrid: the decoder must turn both the continuous latent (discrete tokens + continuous residual,
what generation decodes) and the discrete tokens alone (`f_hat`) into the image, so that the discrete tokens carry
the image's content and the residual only its fine detail. Each step therefore decodes both, as one batch:

- continuous: the latent itself. The quantizer's `f_hat + f_rest` equals the latent in value and, with its
  straight-through estimator, in gradient, so decoding the latent is the same computation without a second pass
  through the quantizer;
- discrete: `vae.quantize(latent, skip_continuous_prob=1)`, whose straight-through `f_hat` passes the decoder's
  gradient to the encoder unchanged and whose VQ loss (codebook term + `beta` x commitment term, averaged over the
  scales) trains the codebook and the `Phi` convs.

Reconstruction loss: L1 + L2 per decode. L2 is what PSNR measures; L1 keeps gradients from vanishing on small errors
and blurs less. (The released tokenizer was also trained with LPIPS, whose VGG weights this offline package does not
ship.) An optional patch-GAN discriminator adds a hinge adversarial term: its own module, `HingeDiscriminatorLoss`,
with its own optimizer, since the generator step must leave the discriminator's weights untouched.
"""

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.utils import BaseOutput

from ..models.autoencoders import HARTAutoEncoder


@dataclass
class HARTTokenizerTrainingLosses(BaseOutput):
    """
    Args:
        loss (`torch.Tensor`): The weighted sum to backpropagate.
        reconstruction_loss (`torch.Tensor`): L1 + L2 of the continuous decode.
        discrete_reconstruction_loss (`torch.Tensor`): L1 + L2 of the discrete-only decode.
        vq_loss (`torch.Tensor`): Codebook + commitment loss of the quantizer.
        generator_adversarial_loss (`torch.Tensor`): Hinge generator loss `-D(reconstruction)` (0 without a
            discriminator).
        reconstructions (`torch.Tensor` of shape `(2B, C, H, W)`): Continuous then discrete decodes, detached: the
            discriminator's fakes.
    """

    loss: torch.Tensor = None
    reconstruction_loss: torch.Tensor = None
    discrete_reconstruction_loss: torch.Tensor = None
    vq_loss: torch.Tensor = None
    generator_adversarial_loss: torch.Tensor = None
    reconstructions: torch.Tensor = None


@dataclass
class DiscriminatorLosses(BaseOutput):
    """
    Args:
        loss (`torch.Tensor`): Hinge loss `relu(1 - D(real)) + relu(1 + D(fake))`, averaged.
        logits_real (`torch.Tensor`): Mean discriminator output on real images.
        logits_fake (`torch.Tensor`): Mean discriminator output on reconstructions.
    """

    loss: torch.Tensor = None
    logits_real: torch.Tensor = None
    logits_fake: torch.Tensor = None


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + L2 between images, averaged over every pixel (computed in float32)."""
    reconstruction, target = reconstruction.float(), target.float()
    return F.l1_loss(reconstruction, target) + F.mse_loss(reconstruction, target)


def psnr(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image of a batch in [-1, 1] (compared in [0, 1]); shape (B,).

    Images are clamped to [-1, 1] first, as a decoded image is saved. Identical images give +inf.
    """
    images = images.float().clamp(-1, 1).add(1).div(2)
    targets = targets.float().clamp(-1, 1).add(1).div(2)
    mse = (images - targets).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)


class HARTTokenizerTrainingModule(nn.Module):
    """The tokenizer's training loss as a forward: images in, `HARTTokenizerTrainingLosses` out.

    Args:
        vae (`HARTAutoEncoder`): The tokenizer being trained.
        vq_weight (`float`, defaults to 1.0): Weight of the quantizer's VQ loss.
        discrete_weight (`float`, defaults to 1.0): Weight of the discrete decode's reconstruction loss relative to
            the continuous one's.
        adversarial_weight (`float`, defaults to 0.1): Weight of the generator's hinge loss when a discriminator is
            passed to `forward`.
    """

    def __init__(
        self,
        vae: HARTAutoEncoder,
        vq_weight: float = 1.0,
        discrete_weight: float = 1.0,
        adversarial_weight: float = 0.1,
    ):
        super().__init__()
        self.vae = vae
        self.vq_weight = vq_weight
        self.discrete_weight = discrete_weight
        self.adversarial_weight = adversarial_weight

    def forward(
        self, pixel_values: torch.Tensor, discriminator: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    ) -> HARTTokenizerTrainingLosses:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): Images in [-1, 1].
            discriminator (`Callable`, *optional*): Logits of images; when given, the generator's adversarial loss
                is added. Pass it frozen (`frozen(discriminator)`): this step must not train it.
        """
        B = pixel_values.shape[0]
        # 1. encode, quantize (straight-through) and decode both latents in one decoder pass
        latent = self.vae._encode(pixel_values)
        f_hat_discrete, vq_loss, _ = self.vae.quantize(latent, skip_continuous_prob=1.0)
        reconstructions = self.vae._decode(torch.cat([latent, f_hat_discrete]))
        continuous, discrete = reconstructions[:B], reconstructions[B:]

        # 2. reconstruction + VQ losses
        rec_continuous = reconstruction_loss(continuous, pixel_values)
        rec_discrete = reconstruction_loss(discrete, pixel_values)
        loss = rec_continuous + self.discrete_weight * rec_discrete + self.vq_weight * vq_loss

        # 3. adversarial loss: the discriminator should take both decodes for real
        adversarial = torch.zeros((), device=loss.device)
        if discriminator is not None:
            adversarial = -discriminator(reconstructions).float().mean()
            loss = loss + self.adversarial_weight * adversarial
        return HARTTokenizerTrainingLosses(
            loss=loss,
            reconstruction_loss=rec_continuous.detach(),
            discrete_reconstruction_loss=rec_discrete.detach(),
            vq_loss=vq_loss.detach(),
            generator_adversarial_loss=adversarial.detach(),
            reconstructions=reconstructions.detach(),
        )


class PatchGANDiscriminator(nn.Module):
    """pix2pix's N-layer patch discriminator (as in taming-transformers' VQGAN): one logit per image patch.

    Args:
        in_channels (`int`, defaults to 3): Image channels.
        base_channels (`int`, defaults to 64): Width of the first layer, doubled per layer up to 8x.
        num_layers (`int`, defaults to 3): Strided layers; each halves the resolution.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out_channels = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last layer keeps the resolution, as pix2pix's
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=False),
                # GroupNorm instead of pix2pix's BatchNorm: no running statistics to synchronize across processes
                nn.GroupNorm(min(32, out_channels // 4), out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # pix2pix's initialization: N(0, 0.02) convs, N(1, 0.02) norm scales
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.GroupNorm):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class HingeDiscriminatorLoss(nn.Module):
    """The discriminator's training loss as a forward (real and fake images in, `DiscriminatorLosses` out)."""

    def __init__(self, discriminator: PatchGANDiscriminator):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> DiscriminatorLosses:
        logits = self.discriminator(torch.cat([real, fake.detach()])).float()
        logits_real, logits_fake = logits[: real.shape[0]], logits[real.shape[0] :]
        loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        return DiscriminatorLosses(
            loss=loss, logits_real=logits_real.mean().detach(), logits_fake=logits_fake.mean().detach()
        )


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """`module` with `requires_grad` off for the duration: gradients flow through it to its inputs, none is
    accumulated on its weights (nor fires a DDP hook of its own wrapper, which is not called)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@torch.no_grad()
def inference_reconstructions(vae: HARTAutoEncoder, pixel_values: torch.Tensor):
    """The two decodes as generation makes them, for held-out evaluation: `(continuous, discrete)` images in
    [-1, 1], `decode(latent)` and `decode(indices_to_fhat(latent_to_indices(latent)))` (the last scale unrefined,
    as the pipeline accumulates it)."""
    latent = vae.encode(pixel_values).latent
    indices, _ = vae.latent_to_indices(latent)
    return vae.decode(latent).sample, vae.decode(vae.indices_to_fhat(indices)).sample
