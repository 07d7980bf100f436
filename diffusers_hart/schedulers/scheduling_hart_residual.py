# Copyright 2025 The HART authors and The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Ancestral (improved-DDPM) sampler of HART's residual diffusion head.

HART's head is a MAR-style "diffusion loss": a small MLP predicts epsilon and a learned-range variance for every
token, sampled with ancestral DDPM steps over a cosine schedule respaced to a handful of steps. All schedule arrays are
built in float64 with numpy, in the same order as the improved-DDPM code HART was trained with, and are rounded to
float32 only when a step uses them, so that float32 samples match the original bit for bit.
"""

import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class HARTResidualDiffusionSchedulerOutput(BaseOutput):
    """
    Output class for the scheduler's `step` function.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels)`):
            Sample `x_{t-1}` of the previous timestep, the next model input of the denoising loop.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels)`):
            The clipped prediction of the denoised sample `x_0` from the current model output.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class HARTDiffusionSchedule:
    """Float64 coefficient arrays of a (possibly respaced) Gaussian diffusion, indexed by step."""

    betas: torch.Tensor
    log_betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    _float32_tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "HARTDiffusionSchedule":
        betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        arrays = {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            # The posterior variance is 0 at the first step; its log is clipped by repeating the second value.
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        return cls(**{name: torch.from_numpy(value) for name, value in arrays.items()})

    def gather(self, name: str, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`name[index]` rounded to float32 and shaped to broadcast against `like` (batch first).

        The lookup happens on `index`'s device, in a float32 copy of the table made once per device (the same values
        as rounding after the lookup), so a training step on a GPU neither waits for nor copies through the host.
        """
        table = self._float32_tables.get((name, index.device))
        if table is None:
            table = self._float32_tables[(name, index.device)] = getattr(self, name).to(torch.float32).to(index.device)
        values = table[index]
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).to(like.device)


# What a sampling step reads of the schedule.
_STEP_COEFFICIENTS = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "log_betas",
    "posterior_log_variance_clipped",
)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the improved-DDPM cosine schedule ("squaredcos_cap_v2"), computed in float64 Python arithmetic."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
            for i in range(num_train_timesteps)
        ]
    )


def evenly_spaced_timesteps(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """Ascending original timesteps kept when striding `num_train_timesteps` down to `num_inference_steps`.

    The stride is fractional and each position is rounded with Python's `round` (half to even), which is how HART's
    respacing picks e.g. `[0, 143, 285, 428, 571, 714, 856, 999]` for 8 steps.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be between 1 and {num_train_timesteps}, got {num_inference_steps}."
        )
    stride = (num_train_timesteps - 1) / (num_inference_steps - 1) if num_inference_steps > 1 else 1
    position, kept = 0.0, []
    for _ in range(num_inference_steps):
        kept.append(round(position))
        position += stride
    return sorted(set(kept))


class HARTResidualDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """
    Ancestral DDPM sampler with a learned-range variance, as used by HART's residual diffusion head.

    The model predicts `2 * C` channels per sample: epsilon and a value in `[-1, 1]` that interpolates the log
    variance between the clipped posterior variance and beta. Sampling runs on the training schedule respaced to
    `num_inference_steps` evenly spaced timesteps, and the model receives the original (un-respaced) timesteps.

    This model inherits from [`SchedulerMixin`] and [`ConfigMixin`]. Check the superclass documentation for the generic
    methods the library implements for all schedulers such as loading and saving.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            The number of diffusion steps used to train the model.
        beta_schedule (`str`, defaults to `"squaredcos_cap_v2"`):
            The beta schedule; only the improved-DDPM cosine schedule (betas capped at 0.999) is supported.
        prediction_type (`str`, defaults to `"epsilon"`):
            What the first half of the model output predicts; only `"epsilon"` is supported.
        variance_type (`str`, defaults to `"learned_range"`):
            How the second half of the model output sets the variance; only `"learned_range"` is supported.
        clip_sample (`bool`, defaults to `True`):
            Clip the predicted original sample to `[-clip_sample_range, clip_sample_range]`.
        clip_sample_range (`float`, defaults to 1.0):
            The clipping bound of the predicted original sample.
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: str = "epsilon",
        variance_type: str = "learned_range",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
    ):
        if beta_schedule != "squaredcos_cap_v2":
            raise ValueError(f"{beta_schedule!r} is not supported; HART uses beta_schedule='squaredcos_cap_v2'.")
        if prediction_type != "epsilon":
            raise ValueError(f"{prediction_type!r} is not supported; HART's head predicts 'epsilon'.")
        if variance_type != "learned_range":
            raise ValueError(f"{variance_type!r} is not supported; HART's head uses variance_type='learned_range'.")
        if num_train_timesteps < 2:
            raise ValueError(f"`num_train_timesteps` must be at least 2, got {num_train_timesteps}.")
        if clip_sample_range <= 0:
            raise ValueError(f"`clip_sample_range` must be positive, got {clip_sample_range}.")

        self._base_alphas_cumprod = np.cumprod(1.0 - cosine_betas(num_train_timesteps))
        # HART trains through the same respacing code with every step kept, so even the training betas are re-derived
        # from the cumulative products (they differ from the raw cosine betas in the last bits).
        self.train_schedule = self._respaced_schedule(list(range(num_train_timesteps)))
        # Until `set_timesteps` is called, sampling runs over every training step.
        self.num_inference_steps = None
        self.timestep_map = torch.arange(num_train_timesteps)
        self.timesteps = self.timestep_map.flip(0)
        self.schedule = self.train_schedule
        self._prepare_steps(None)

    def _respaced_schedule(self, kept_timesteps: list[int]) -> HARTDiffusionSchedule:
        betas, last_alpha_cumprod = [], 1.0
        for t in kept_timesteps:
            betas.append(1 - self._base_alphas_cumprod[t] / last_alpha_cumprod)
            last_alpha_cumprod = self._base_alphas_cumprod[t]
        return HARTDiffusionSchedule.from_betas(np.array(betas))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Returns `sample` unchanged; DDPM sampling needs no input scaling."""
        return sample

    def set_timesteps(self, num_inference_steps: int | str = 8, device: str | torch.device | None = None) -> None:
        """
        Respaces the schedule to `num_inference_steps` evenly spaced training timesteps.

        Args:
            num_inference_steps (`int` or `str`, defaults to 8):
                The number of sampling steps, at least 2. A string must be a plain integer such as HART's
                `num_sampling_steps: "8"`; the original's section lists (`"4,4"`) and `"ddimN"` striding are rejected.
            device (`str` or `torch.device`, *optional*):
                The device `self.timesteps` is moved to.
        """
        if isinstance(num_inference_steps, str):
            if not num_inference_steps.strip().isdigit():
                raise ValueError(
                    f"num_inference_steps={num_inference_steps!r} is not supported; pass a plain step count such as 8 "
                    "(section lists and 'ddimN' striding are not implemented)."
                )
            num_inference_steps = int(num_inference_steps)
        if num_inference_steps < 2:
            raise ValueError(f"`num_inference_steps` must be at least 2, got {num_inference_steps}.")
        kept = evenly_spaced_timesteps(self.config.num_train_timesteps, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.schedule = self._respaced_schedule(kept)
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self.timesteps = self.timestep_map.flip(0).to(device)
        self._prepare_steps(device)

    def _prepare_steps(self, device) -> None:
        # Each step's coefficients, rounded to float32 once and kept on the sampling device, and the position in
        # `self.timesteps` of the next step: a step then reads neither a device tensor nor the host's float64 arrays.
        self._step_coefficients = {
            name: getattr(self.schedule, name).to(torch.float32).to(device) for name in _STEP_COEFFICIENTS
        }
        self._timestep_index = {int(t): i for i, t in enumerate(self.timestep_map.tolist())}
        self._next_position = 0

    def _step_index(self, timestep: int | torch.Tensor) -> int:
        """Index in the respaced schedule of `timestep`.

        A Python number or a CPU tensor is looked up (any order works). A device tensor is taken to be the next entry
        of `self.timesteps`, as in the sampling loop: reading it would wait for the device.
        """
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            return len(self.timestep_map) - 1 - self._next_position
        if int(timestep) not in self._timestep_index:
            raise ValueError(f"Timestep {int(timestep)} is not one of the scheduler's timesteps {self.timesteps}.")
        return self._timestep_index[int(timestep)]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        variance_noise: torch.Tensor | None = None,
    ) -> HARTResidualDiffusionSchedulerOutput | tuple:
        """
        Predicts the sample of the previous timestep by one ancestral step of the respaced schedule.

        Args:
            model_output (`torch.Tensor` of shape `(batch_size, 2 * num_channels)`):
                Epsilon followed by the learned variance interpolation value in `[-1, 1]`.
            timestep (`int` or `torch.Tensor`):
                The current original timestep, an entry of `self.timesteps`. On an accelerator, pass the entries of
                `self.timesteps` in order (the sampling loop does): the step does not read the tensor back.
            sample (`torch.Tensor` of shape `(batch_size, num_channels)`):
                The current noisy sample `x_t`.
            generator (`torch.Generator`, *optional*):
                Source of the step noise. Noise is drawn at every step, the last one included (where it is not used),
                so that the random stream stays aligned with the original sampler.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`HARTResidualDiffusionSchedulerOutput`] or a plain tuple.
            variance_noise (`torch.Tensor`, *optional*):
                Noise to use instead of drawing it from `generator` (as in diffusers' DDIM scheduler), e.g. to give
                every image of a batch its own generator.

        Returns:
            [`HARTResidualDiffusionSchedulerOutput`] or `tuple`: the previous sample and the clipped `x_0` prediction.
        """
        index = self._step_index(timestep)
        self._next_position = len(self.timestep_map) - index

        epsilon, variance_values = model_output.split(sample.shape[1], dim=1)
        def coef(name):
            return self._step_coefficients[name][index].to(sample.device)


        pred_original_sample = (
            coef("sqrt_recip_alphas_cumprod") * sample - coef("sqrt_recipm1_alphas_cumprod") * epsilon
        )
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)
        prev_sample = coef("posterior_mean_coef1") * pred_original_sample + coef("posterior_mean_coef2") * sample

        noise = variance_noise
        if noise is None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        if index > 0:
            fraction = (variance_values + 1) / 2
            log_variance = fraction * coef("log_betas") + (1 - fraction) * coef("posterior_log_variance_clipped")
            prev_sample = prev_sample + torch.exp(0.5 * log_variance) * noise

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return HARTResidualDiffusionSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Diffuses `original_samples` to the training `timesteps` (one per sample): `q(x_t | x_0)`."""
        return (
            self.train_schedule.gather("sqrt_alphas_cumprod", timesteps, original_samples) * original_samples
            + self.train_schedule.gather("sqrt_one_minus_alphas_cumprod", timesteps, original_samples) * noise
        )

    def training_losses(
        self, model_output: torch.Tensor, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """
        Per-sample training loss of HART's head: MSE on epsilon plus the variational-bound term of the variance.

        The variational term (in bits per dimension) is the KL between the true posterior and the model's
        `p(x_{t-1} | x_t)`, or the discretized decoder NLL at `t == 0`. Gradients reach the variance channels only
        through it: the epsilon channels are detached there, so they learn from the MSE alone.

        Args:
            model_output (`torch.Tensor` of shape `(batch_size, 2 * num_channels)`):
                The model output on `self.add_noise(original_samples, noise, timesteps)`.
            original_samples (`torch.Tensor` of shape `(batch_size, num_channels)`):
                The clean samples `x_0` (HART divides its residual targets by 0.6 first).
            noise (`torch.Tensor`): The noise given to `add_noise`.
            timesteps (`torch.Tensor` of shape `(batch_size,)`): Training timesteps in `[0, num_train_timesteps)`.

        Returns:
            `torch.Tensor` of shape `(batch_size,)`: the loss of every sample (HART averages it).
        """
        coef = partial(self.train_schedule.gather, index=timesteps, like=original_samples)
        noisy_samples = self.add_noise(original_samples, noise, timesteps)
        epsilon, variance_values = model_output.split(original_samples.shape[1], dim=1)
        reduce_dims = list(range(1, original_samples.ndim))

        true_mean = coef("posterior_mean_coef1") * original_samples + coef("posterior_mean_coef2") * noisy_samples
        true_log_variance = coef("posterior_log_variance_clipped")
        pred_original_sample = (
            coef("sqrt_recip_alphas_cumprod") * noisy_samples - coef("sqrt_recipm1_alphas_cumprod") * epsilon.detach()
        )
        model_mean = coef("posterior_mean_coef1") * pred_original_sample + coef("posterior_mean_coef2") * noisy_samples
        fraction = (variance_values + 1) / 2
        model_log_variance = fraction * coef("log_betas") + (1 - fraction) * true_log_variance

        kl = 0.5 * (
            -1.0
            + model_log_variance
            - true_log_variance
            + torch.exp(true_log_variance - model_log_variance)
            + ((true_mean - model_mean) ** 2) * torch.exp(-model_log_variance)
        )
        kl = kl.mean(dim=reduce_dims) / math.log(2.0)
        decoder_nll = -_discretized_gaussian_log_likelihood(
            original_samples, model_mean, 0.5 * model_log_variance
        ).mean(dim=reduce_dims) / math.log(2.0)
        vb = torch.where(timesteps.to(kl.device) == 0, decoder_nll, kl)

        mse = ((noise - epsilon) ** 2).mean(dim=reduce_dims)
        return mse + vb


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation of the standard normal CDF, kept because the original loss uses it.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor):
    # Log-likelihood of x under a Gaussian discretized to 8-bit bins of [-1, 1] (edge bins open-ended), in nats.
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


__all__ = ["HARTDiffusionSchedule", "HARTResidualDiffusionScheduler", "HARTResidualDiffusionSchedulerOutput"]
