"""HARTResidualDiffusionScheduler: schedule arrays and respacing against the original's golden data."""

import pytest
import torch
from conftest import CASES

from diffusers_hart.schedulers import HARTResidualDiffusionScheduler


RESPACED = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def _scheduler_for(golden, case):
    scheduler = HARTResidualDiffusionScheduler()
    # The checkpoint config stores the step count as a string ("8"), as the original's respacing takes it.
    scheduler.set_timesteps(golden.case(case)["transformer_config"]["num_sampling_steps"])
    return scheduler


@pytest.mark.parametrize("case", CASES)
def test_schedules_match_golden(golden, case):
    expected = golden.tensors(case)
    scheduler = _scheduler_for(golden, case)
    for name in RESPACED:
        actual = getattr(scheduler.schedule, name)
        assert actual.dtype == torch.float64
        golden.assert_close(f"diff.schedule.{name}", actual, expected[f"diff.schedule.{name}"])
    golden.assert_close(
        "diff.schedule.train_betas", scheduler.train_schedule.betas, expected["diff.schedule.train_betas"]
    )
    golden.assert_close(
        "diff.schedule.train_alphas_cumprod",
        scheduler.train_schedule.alphas_cumprod,
        expected["diff.schedule.train_alphas_cumprod"],
    )


@pytest.mark.parametrize("case", CASES)
def test_timesteps_match_golden(golden, case):
    expected = golden.tensors(case)
    scheduler = _scheduler_for(golden, case)
    golden.assert_close("diff.schedule.timestep_map", scheduler.timestep_map, expected["diff.schedule.timestep_map"])
    assert torch.equal(scheduler.timesteps, expected["diff.schedule.timestep_map"].flip(0))
    # The original's p_sample loop walks the respaced indices 7..0; ours walks the mapped timesteps in that order.
    indices = torch.tensor([scheduler.timestep_map.tolist().index(int(t)) for t in scheduler.timesteps])
    for smooth in (0, 1):
        golden.assert_close(f"gen.smooth{smooth}.diff.step_t", indices, expected[f"gen.smooth{smooth}.diff.step_t"])


def test_integer_and_string_step_counts_agree():
    a, b = HARTResidualDiffusionScheduler(), HARTResidualDiffusionScheduler()
    a.set_timesteps(8)
    b.set_timesteps("8")
    assert torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(a.schedule.posterior_mean_coef1, b.schedule.posterior_mean_coef1)


def test_full_respacing_is_the_training_schedule():
    scheduler = HARTResidualDiffusionScheduler()
    assert torch.equal(scheduler.timesteps, torch.arange(999, -1, -1))
    scheduler.set_timesteps(1000)
    assert torch.equal(scheduler.schedule.betas, scheduler.train_schedule.betas)


def test_config_round_trip(tmp_path):
    scheduler = HARTResidualDiffusionScheduler(clip_sample_range=2.0)
    scheduler.save_pretrained(tmp_path)
    loaded = HARTResidualDiffusionScheduler.from_pretrained(tmp_path)
    for key, value in scheduler.config.items():
        if not key.startswith("_"):  # skip bookkeeping such as the diffusers version
            assert loaded.config[key] == value, key
    assert loaded.config.clip_sample_range == 2.0
    assert torch.equal(loaded.train_schedule.betas, scheduler.train_schedule.betas)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta_schedule": "linear"},
        {"prediction_type": "v_prediction"},
        {"variance_type": "fixed_small"},
        {"clip_sample_range": 0.0},
        {"num_train_timesteps": 1},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        HARTResidualDiffusionScheduler(**kwargs)


@pytest.mark.parametrize("steps", ["ddim8", "4,4", "", 1, 0, 1001])
def test_bad_step_counts_raise(steps):
    with pytest.raises(ValueError):
        HARTResidualDiffusionScheduler().set_timesteps(steps)


def test_step_rejects_unknown_timestep():
    scheduler = HARTResidualDiffusionScheduler()
    scheduler.set_timesteps(8)
    with pytest.raises(ValueError):
        scheduler.step(torch.zeros(2, 16), 500, torch.zeros(2, 8))


def test_add_noise_matches_float64_formula(golden):
    expected = golden.tensors(CASES[0])
    x_start, noise, t = expected["train.diff_x_start"], expected["train.diff_noise"], expected["train.diff_t"]
    scheduler = HARTResidualDiffusionScheduler()
    alphas_cumprod = expected["diff.schedule.train_alphas_cumprod"][t][:, None]
    reference = alphas_cumprod.sqrt() * x_start.double() + (1 - alphas_cumprod).sqrt() * noise.double()
    torch.testing.assert_close(scheduler.add_noise(x_start, noise, t).double(), reference, atol=1e-6, rtol=1e-6)
