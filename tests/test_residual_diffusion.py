"""HART's residual diffusion head: checkpoint conversion, golden sampling parity and the training loss."""

import dataclasses
import math

import pytest
import torch
from conftest import CASES

import diffusers_hart.pipelines.hart.residual_sampling as sampling_module
import diffusers_hart.schedulers.scheduling_hart_residual as scheduler_module
from diffusers_hart.conversion.diffusion_head_checkpoint import convert_diffusion_head_state_dict
from diffusers_hart.conversion.state_dict_utils import CheckpointKeyError
from diffusers_hart.models.residual_diffusion import HARTResidualDiffusionMLP
from diffusers_hart.pipelines.hart.residual_sampling import sample_residual_tokens
from diffusers_hart.schedulers import HARTResidualDiffusionScheduler


LATENT_CHANNELS = 8  # the tokenizer's z_channels


def _ema_state_dict(golden, case):
    return torch.load(golden.root / case / "llm" / "ema_model.bin", map_location="cpu", weights_only=True)


def _build_head(golden, case):
    config = golden.case(case)["transformer_config"]
    return HARTResidualDiffusionMLP(
        in_channels=LATENT_CHANNELS,
        model_channels=config["diff_width"],
        out_channels=2 * LATENT_CHANNELS,
        condition_channels=config["embed_dim"],
        num_res_blocks=config["diff_depth"],
    )


def _head(golden, case):
    head = _build_head(golden, case)
    converted = convert_diffusion_head_state_dict(_ema_state_dict(golden, case))
    head.load_state_dict({key.removeprefix("diffusion_head."): value for key, value in converted.items()})
    return head.eval()


@pytest.mark.parametrize("case", CASES)
def test_conversion_pops_exactly_the_head(golden, case):
    state_dict = _ema_state_dict(golden, case)
    others = {key for key in state_dict if not key.startswith("diffloss.net.")}
    converted = convert_diffusion_head_state_dict(state_dict)
    assert set(state_dict) == others
    assert set(converted) == {"diffusion_head." + key for key in _build_head(golden, case).state_dict()}


def test_conversion_reports_missing_keys(golden):
    state_dict = _ema_state_dict(golden, CASES[0])
    del state_dict["diffloss.net.res_blocks.1.mlp.2.bias"]
    with pytest.raises(CheckpointKeyError, match=r"res_blocks\.1\.mlp\.2\.bias"):
        convert_diffusion_head_state_dict(state_dict)


class _Recorder:
    """Wraps `randn_tensor` and `scheduler.step` to record the noise draws and the x0 predictions."""

    def __init__(self, monkeypatch, scheduler):
        self.draws, self.pred_original = [], []
        original_randn, original_step = scheduler_module.randn_tensor, scheduler.step

        def randn(*args, **kwargs):
            self.draws.append(original_randn(*args, **kwargs))
            return self.draws[-1]

        def step(*args, **kwargs):
            output = original_step(*args, **kwargs)
            self.pred_original.append(output.pred_original_sample)
            return output

        monkeypatch.setattr(scheduler_module, "randn_tensor", randn)
        monkeypatch.setattr(sampling_module, "randn_tensor", randn)
        monkeypatch.setattr(scheduler, "step", step)


@pytest.mark.parametrize("smooth", (0, 1))
@pytest.mark.parametrize("case", CASES)
def test_sampling_matches_golden(golden, case, smooth, monkeypatch):
    expected = golden.tensors(case)
    prefix = f"gen.smooth{smooth}.diff"
    seed = golden.case(case)["seed"]
    scheduler = HARTResidualDiffusionScheduler()
    recorder = _Recorder(monkeypatch, scheduler)
    generator = torch.Generator().manual_seed(seed)

    sample = sample_residual_tokens(
        _head(golden, case),
        scheduler,
        expected[f"{prefix}.z"],
        expected[f"{prefix}.cfg"].item(),
        generator=generator,
        num_inference_steps=golden.case(case)["transformer_config"]["num_sampling_steps"],
    )

    # The reference draws from the global RNG seeded with the case seed: the same stream as our generator.
    assert len(recorder.draws) == 1 + len(scheduler.timesteps)
    golden.assert_close(f"{prefix}.noise_init", recorder.draws[0], expected[f"{prefix}.noise_init"])
    golden.assert_close(f"{prefix}.step_noise", torch.stack(recorder.draws[1:]), expected[f"{prefix}.step_noise"])
    # Nothing else consumed the generator.
    replay = torch.Generator().manual_seed(seed)
    for draw in recorder.draws:
        torch.randn(draw.shape, generator=replay)
    assert torch.equal(generator.get_state(), replay.get_state())

    golden.assert_close(
        f"{prefix}.step_pred_xstart", torch.stack(recorder.pred_original), expected[f"{prefix}.step_pred_xstart"]
    )
    golden.assert_close(f"{prefix}.sample_full", sample, expected[f"{prefix}.sample_full"])
    diffusion = expected[f"gen.smooth{smooth}.diffusion"]
    kept = sample[: diffusion.shape[0] * diffusion.shape[1]]  # the caller keeps the conditional half
    golden.assert_close(f"gen.smooth{smooth}.diffusion", kept.view_as(diffusion), diffusion)


def test_unguided_sampling_is_the_plain_ancestral_loop(golden):
    case = CASES[0]
    head = _head(golden, case)
    condition = golden.tensors(case)["gen.smooth0.diff.z"][:16]
    scheduler = HARTResidualDiffusionScheduler()
    sample = sample_residual_tokens(head, scheduler, condition, None, generator=torch.Generator().manual_seed(0))

    generator = torch.Generator().manual_seed(0)
    expected = torch.randn(16, LATENT_CHANNELS, generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_output = head(expected, t.expand(16), condition)
            expected = scheduler.step(model_output, t, expected, generator=generator).prev_sample
    assert torch.equal(sample, expected * 0.6)


def test_guidance_needs_paired_rows(golden):
    head = _head(golden, CASES[0])
    with pytest.raises(ValueError):
        sample_residual_tokens(head, HARTResidualDiffusionScheduler(), torch.zeros(3, 64), 2.0)


def _training_inputs(golden):
    expected = golden.tensors(CASES[0])
    x_start, noise = expected["train.diff_x_start"], expected["train.diff_noise"]
    timesteps = expected["train.diff_t"].clone()
    timesteps[:8] = 0  # make sure the decoder-NLL branch (t == 0) is exercised
    return x_start, noise, timesteps


def _learned_range_output(scheduler, epsilon, log_variance, timesteps):
    # Inverts the learned-range interpolation: the variance value that gives `log_variance`.
    low = scheduler.train_schedule.posterior_log_variance_clipped[timesteps][:, None]
    high = scheduler.train_schedule.log_betas[timesteps][:, None]
    return torch.cat([epsilon, (2 * (log_variance - low) / (high - low) - 1).float()], dim=1)


def test_training_loss_of_a_perfect_model(golden):
    x_start, noise, timesteps = _training_inputs(golden)
    scheduler = HARTResidualDiffusionScheduler()
    true_log_variance = scheduler.train_schedule.posterior_log_variance_clipped[timesteps][:, None].expand_as(noise)
    model_output = _learned_range_output(scheduler, noise, true_log_variance, timesteps)
    loss = scheduler.training_losses(model_output, x_start, noise, timesteps)
    assert loss.shape == timesteps.shape
    # At t > 0 the loss is a KL between equal Gaussians (and an MSE of 0). At t == 0 it is the NLL of a bin narrower
    # than the posterior spread, which stays positive even for a perfect model.
    noisy = timesteps > 0
    torch.testing.assert_close(loss[noisy], torch.zeros_like(loss[noisy]), atol=1e-4, rtol=0)
    assert (loss[~noisy] > 0).all()


def test_training_loss_matches_float64_gaussian_terms(golden):
    x_start, noise, timesteps = _training_inputs(golden)
    scheduler = HARTResidualDiffusionScheduler()
    schedule = scheduler.train_schedule
    generator = torch.Generator().manual_seed(0)
    epsilon = noise + 0.1 * torch.randn(noise.shape, generator=generator)
    variance_values = torch.rand(noise.shape, generator=generator) * 2 - 1
    loss = scheduler.training_losses(torch.cat([epsilon, variance_values], 1), x_start, noise, timesteps)

    # The same quantities in float64 with the textbook formulas (and the exact normal CDF at t == 0).
    tables = [field.name for field in dataclasses.fields(schedule) if field.init]
    coef = {name: getattr(schedule, name)[timesteps][:, None] for name in tables}
    x0, eps, n = x_start.double(), epsilon.double(), noise.double()
    x_t = coef["sqrt_alphas_cumprod"] * x0 + coef["sqrt_one_minus_alphas_cumprod"] * n
    true_mean = coef["posterior_mean_coef1"] * x0 + coef["posterior_mean_coef2"] * x_t
    pred_x0 = coef["sqrt_recip_alphas_cumprod"] * x_t - coef["sqrt_recipm1_alphas_cumprod"] * eps
    model_mean = coef["posterior_mean_coef1"] * pred_x0 + coef["posterior_mean_coef2"] * x_t
    fraction = (variance_values.double() + 1) / 2
    model_logvar = fraction * coef["log_betas"] + (1 - fraction) * coef["posterior_log_variance_clipped"]
    true_logvar = coef["posterior_log_variance_clipped"]
    kl = 0.5 * (
        model_logvar - true_logvar + (true_logvar.exp() + (true_mean - model_mean) ** 2) / model_logvar.exp() - 1
    )
    normal = torch.distributions.Normal(model_mean, (0.5 * model_logvar).exp())
    bin_probability = normal.cdf(x0 + 1 / 255) - normal.cdf(x0 - 1 / 255)
    bin_probability = torch.where(x0 < -0.999, normal.cdf(x0 + 1 / 255), bin_probability)
    bin_probability = torch.where(x0 > 0.999, 1 - normal.cdf(x0 - 1 / 255), bin_probability)
    vb = torch.where(timesteps[:, None] == 0, -bin_probability.clamp(min=1e-12).log(), kl).mean(1) / math.log(2)
    reference = ((n - eps) ** 2).mean(1) + vb

    noisy = timesteps > 0
    torch.testing.assert_close(loss[noisy].double(), reference[noisy], atol=1e-5, rtol=1e-4)
    # The original approximates the normal CDF with tanh; that is all that separates the t == 0 rows.
    torch.testing.assert_close(loss[~noisy].double(), reference[~noisy], atol=3e-3, rtol=1e-3)


def test_training_loss_trains_epsilon_by_mse_only(golden):
    x_start, noise, timesteps = _training_inputs(golden)
    scheduler = HARTResidualDiffusionScheduler()
    model_output = torch.randn(noise.shape[0], 2 * noise.shape[1], generator=torch.Generator().manual_seed(1))
    model_output.requires_grad_(True)
    scheduler.training_losses(model_output, x_start, noise, timesteps).sum().backward()
    epsilon = model_output.detach()[:, : noise.shape[1]]
    torch.testing.assert_close(model_output.grad[:, : noise.shape[1]], 2 * (epsilon - noise) / noise.shape[1])
    assert model_output.grad[:, noise.shape[1] :].abs().sum() > 0
