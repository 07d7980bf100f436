"""Sampling of HART's last-scale residual tokens with the diffusion head (the original `DiffLoss.sample`)."""

from typing import Callable, Optional, Tuple

import torch
from diffusers.utils.torch_utils import randn_tensor

from ...models.residual_diffusion import HARTResidualDiffusionMLP
from ...schedulers.scheduling_hart_residual import HARTResidualDiffusionScheduler


@torch.no_grad()
def sample_residual_tokens(
    diffusion_head: HARTResidualDiffusionMLP,
    scheduler: HARTResidualDiffusionScheduler,
    condition: torch.Tensor,
    guidance_scale: Optional[float],
    generator: torch.Generator | None = None,
    num_inference_steps: int | str = 8,
    sample_scale: float = 0.6,
    draw_noise: Optional[Callable[[Tuple[int, int]], torch.Tensor]] = None,
) -> torch.Tensor:
    """
    Samples one residual token per condition row by ancestral DDPM with classifier-free guidance.

    Random draws, all from `generator` and in this order: the initial noise of the conditional rows, then one noise
    tensor of the full batch per step (the last step included). On CPU this reproduces the original sampler, which
    draws the same tensors from the global RNG.

    Args:
        diffusion_head (`HARTResidualDiffusionMLP`): The denoiser.
        scheduler (`HARTResidualDiffusionScheduler`): Its sampler; `set_timesteps` is called on it.
        condition (`torch.Tensor` of shape `(2N, C_cond)`):
            Conditional rows followed by unconditional rows; `(N, C_cond)` without guidance.
        guidance_scale (`float` or `None`):
            Guidance `g` on epsilon: `(1 + g) * eps_cond - g * eps_uncond` (HART passes its stale last-stage ratio
            times the image CFG scale). `None` samples the rows of `condition` without guidance. Every number
            guides, 1.0 included: the original switches guidance off at exactly 1.0, a jump this port does not keep.
        generator (`torch.Generator`, *optional*): Source of all noise.
        num_inference_steps (`int` or `str`, defaults to 8): Number of respaced DDPM steps.
        sample_scale (`float`, defaults to 0.6): Factor from the head's sample space to latent units (HART's
            `vae_scale`).
        draw_noise (`Callable`, *optional*): `draw_noise((rows, C))` returns the noise of each draw above instead of
            `generator`; the pipeline uses it to give every image its own generator.

    Returns:
        `torch.Tensor` of shape `(condition.shape[0], C)`: the scaled samples. Under guidance both halves are returned;
        the conditional half `[:N]` is the result (the unconditional half follows its own variance channels).
    """
    do_guidance = guidance_scale is not None
    num_rows = condition.shape[0]
    if do_guidance:
        if num_rows % 2:
            raise ValueError(f"Guidance needs conditional and unconditional rows; got an odd batch of {num_rows}.")
        num_rows //= 2
    channels = diffusion_head.in_channels
    # the trajectory stays in float32 whatever the head's dtype: 8 ancestral steps amplify rounding
    head_dtype = condition.dtype

    if draw_noise is None:
        def draw_noise(shape):
            return randn_tensor(shape, generator=generator, device=condition.device, dtype=torch.float32)

    scheduler.set_timesteps(num_inference_steps, device=condition.device)
    sample = draw_noise((num_rows, channels))
    if do_guidance:
        sample = torch.cat([sample, sample])

    for t in scheduler.timesteps:
        timestep = t.expand(sample.shape[0])
        if do_guidance:
            # Both halves denoise the conditional half's sample: the unconditional half only supplies eps_uncond
            # (and keeps its own variance channels), so its trajectory never feeds back into the result.
            half = sample[:num_rows]
            model_output = diffusion_head(torch.cat([half, half]).to(head_dtype), timestep, condition).float()
            epsilon, variance_values = model_output.split(channels, dim=1)
            eps_cond, eps_uncond = epsilon.chunk(2)
            guided = eps_cond * (1 + guidance_scale) - guidance_scale * eps_uncond
            model_output = torch.cat([torch.cat([guided, guided]), variance_values], dim=1)
        else:
            model_output = diffusion_head(sample.to(head_dtype), timestep, condition).float()
        sample = scheduler.step(model_output, t, sample, variance_noise=draw_noise(tuple(sample.shape))).prev_sample
    return sample * sample_scale
