"""Parity of the training step with the original `HARTForT2I.forward` (non-EMA `model.safetensors` weights).

The original draws its keep mask with numpy/scipy, so the golden keep mask is injected; the cond drop, diffusion
timesteps and noise are injected too, or replayed from a generator seeded like the original's global torch RNG.
"""

import copy

import pytest
import torch
from conftest import CASES

from diffusers_hart import HARTResidualDiffusionScheduler
from diffusers_hart.conversion.convert_hart_to_diffusers import convert_transformer_folder
from diffusers_hart.conversion.tokenizer_checkpoint import load_tokenizer_folder
from diffusers_hart.training import (
    hart_training_outputs,
    last_scale_keep_from_orders,
    sample_last_scale_keep,
    sample_mask_ratio,
    token_cross_entropy,
    token_targets,
)


@pytest.fixture(scope="module")
def vae(golden):
    return load_tokenizer_folder(golden.root / "tokenizer").eval()


@pytest.fixture(scope="module")
def models(golden, vae):
    return {case: convert_transformer_folder(golden.root / case / "llm", vae, use_ema=False)[0] for case in CASES}


def _inputs(expected):
    """The original's forward inputs, cloned so that a test can check they are left untouched."""
    return dict(
        context=expected["train.context"].clone(),
        context_mask=expected["text.context_mask"].clone(),
        context_position_ids=expected["text.context_position_ids"].clone(),
        teacher_forcing_input=expected["train.x_BLCv_wo_first_l"].clone(),
        last_scale_target=expected["train.last_layer_gt"].clone(),
        fallback_indices=expected["train.last_layer_gt_discrete"].clone(),
    )


def _assert_unchanged(inputs, expected):
    for name, key in [
        ("context", "train.context"),
        ("teacher_forcing_input", "train.x_BLCv_wo_first_l"),
        ("last_scale_target", "train.last_layer_gt"),
    ]:
        assert torch.equal(inputs[name], expected[key]), f"{name} was modified"


def _compare_outputs(golden, out, expected):
    golden.assert_close("train.logits", out.logits, expected["train.logits"])
    golden.assert_close("train.idx_sampled", out.sampled_indices, expected["train.idx_sampled"])
    per_sample = out.diffusion_loss_per_sample
    golden.assert_close("train.diff_loss_per_sample", per_sample, expected["train.diff_loss_per_sample"])
    golden.assert_close("train.diff_loss", out.diffusion_loss.reshape(1), expected["train.diff_loss"])


def _golden_step(model, vae, expected, inputs, seed, **draws):
    """One step with the golden keep mask and the original's sampling generator; other draws as given."""
    with torch.no_grad():
        return hart_training_outputs(
            model,
            HARTResidualDiffusionScheduler(),
            vae.quantize.embedding.weight,
            **inputs,
            last_scale_keep=expected["train.kept_last_scale"],
            sampling_generator=torch.Generator().manual_seed(seed),
            **draws,
        )


@pytest.mark.parametrize("case", CASES)
def test_training_step_matches_original(case, golden, models, vae):
    expected, seed = golden.tensors(case), golden.case(case)["train_seed"]
    inputs = _inputs(expected)
    out = _golden_step(models[case], vae, expected, inputs, seed,
        cond_dropped=expected["train.cond_dropped"],
        diffusion_timesteps=expected["train.diff_t"],
        diffusion_noise=expected["train.diff_noise"],
    )  # fmt: skip
    assert not out.used_fallback_indices
    _compare_outputs(golden, out, expected)
    _assert_unchanged(inputs, expected)
    # one row is dropped: the step must not zero the caller's copy of it
    assert expected["train.cond_dropped"].any() and inputs["context"][expected["train.cond_dropped"]].abs().sum() > 0


def test_generator_replays_original_torch_stream(golden, models, vae):
    """With only the keep mask injected, a generator seeded with the train seed draws the original's cond drop,
    timesteps and noise (the original's global torch RNG), so the outputs still match."""
    case = CASES[0]
    expected, seed = golden.tensors(case), golden.case(case)["train_seed"]
    out = _golden_step(models[case], vae, expected, _inputs(expected), seed, generator=torch.Generator().manual_seed(seed))
    golden.assert_close("train.cond_dropped", out.draws.cond_dropped, expected["train.cond_dropped"])
    golden.assert_close("train.diff_t", out.draws.diffusion_timesteps, expected["train.diff_t"])
    golden.assert_close("train.diff_noise", out.draws.diffusion_noise, expected["train.diff_noise"])
    _compare_outputs(golden, out, expected)


@pytest.mark.parametrize("case", CASES)
def test_keep_mask_from_recorded_orders(case, golden):
    expected = golden.tensors(case)
    keep = last_scale_keep_from_orders(expected["train.orders"], expected["train.mask_rate"].item())
    golden.assert_close("train.kept_last_scale", keep, expected["train.kept_last_scale"])


def test_keep_mask_distribution():
    generator = torch.Generator().manual_seed(0)
    ratios = torch.tensor([sample_mask_ratio(generator) for _ in range(4000)])
    assert ratios.min() >= 0.5 and ratios.max() <= 1.0
    # mean of normal(1, 0.25) truncated to [0.5, 1]: 1 - 0.25 * (phi(0) - phi(-2)) / (Phi(0) - Phi(-2)) = 0.8193
    assert abs(ratios.mean().item() - 0.8193) < 0.01
    keep = sample_last_scale_keep(3, 256, generator)
    assert keep.shape == (3, 256) and (keep.sum(dim=1) == keep.sum(dim=1)[0]).all()
    assert 32 <= keep.sum(dim=1)[0] <= 128
    assert not torch.equal(keep[0], keep[1])  # each row has its own order


def test_gradient_step_reaches_blocks_and_head(golden, models, vae):
    case = CASES[0]
    expected = golden.tensors(case)
    model = copy.deepcopy(models[case]).train()
    codebook = vae.quantize.embedding.weight
    inputs = _inputs(expected)
    # every random choice drawn from the generator
    out = hart_training_outputs(
        model, HARTResidualDiffusionScheduler(), codebook, **inputs, generator=torch.Generator().manual_seed(7)
    )
    num_stages = len(model.config.patch_nums)
    indices = [golden.tensors("vae")[f"vae.indices.{si}"] for si in range(num_stages)]
    targets = token_targets(indices, out.draws.last_scale_keep)
    assert targets.shape == out.logits.shape[:2]
    loss = token_cross_entropy(out.logits, targets) + out.diffusion_loss
    assert torch.isfinite(loss)
    model.zero_grad()
    loss.backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    for index, block in enumerate(model.transformer_blocks):
        assert has_grad(block.attn) and has_grad(block.ff), f"block {index} got no gradient"
    assert has_grad(model.diffusion_head) and has_grad(model.diffusion_condition_norm)
    assert has_grad(model.proj_out) and has_grad(model.context_embed) and has_grad(model.latent_embed)
    assert codebook.grad is None

    before = [p.detach().clone() for p in model.diffusion_head.parameters()]
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.diffusion_head.parameters()))
    _assert_unchanged(inputs, expected)


def test_non_finite_logits_are_explicit(golden, models, vae):
    """The original's bare `except` falls back to ground-truth indices; here only non-finite logits do, loudly."""
    case = CASES[0]
    expected = golden.tensors(case)
    model = copy.deepcopy(models[case])
    with torch.no_grad():
        model.proj_out.bias.fill_(float("nan"))
    keep = expected["train.kept_last_scale"]
    scheduler, codebook = HARTResidualDiffusionScheduler(), vae.quantize.embedding.weight
    kwargs = dict(last_scale_keep=keep, generator=torch.Generator().manual_seed(0))
    inputs = _inputs(expected)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="non-finite"):
            out = hart_training_outputs(model, scheduler, codebook, **inputs, **kwargs)
        assert out.used_fallback_indices
        assert torch.equal(out.sampled_indices, expected["train.last_layer_gt_discrete"][keep].view(2, -1))
        assert torch.isfinite(out.diffusion_loss)
        inputs["fallback_indices"] = None
        with pytest.raises(FloatingPointError):
            hart_training_outputs(model, scheduler, codebook, **inputs, **kwargs)
