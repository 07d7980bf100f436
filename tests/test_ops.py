"""The fused Triton kernels of `diffusers_hart.ops` against their torch references, and the dispatch rules.

Kernel tests run on CUDA when there is a GPU, else on the CPU in Triton's interpreter (`TRITON_INTERPRET=1`, set
per test by the `kernels` fixture, so no other test module sees it), and skip when triton is not installed. The
dispatch tests need neither.

Tolerances. Both paths compute in float32 and round to the output dtype where the other does (the kernels mirror
the reference's roundings op by op, with floating-point contraction off), so they can only differ through
float32 differences (summation order, exp/rsqrt implementations) that a final rounding may turn into one ulp. With
eps = torch.finfo(dtype).eps (the spacing of the dtype at 1, so one ulp of v is at most eps * |v|):

* float16/bfloat16: a rounded intermediate can land one ulp apart (its float32 values straddled a rounding
  boundary), and each later rounding adds at most one more: LOW_PRECISION_ULPS = 4 ulps of the magnitude of the
  terms covers the longest chain (normalise, times weight, times (1 + scale), plus shift).
* float32: every value carries the float32 differences themselves: sums of at most 1536 squares in two orders
  (each within about log2(1536) + 2 = 13 roundings of the exact sum for tree-like orders), halved by the rsqrt,
  plus the rsqrt and exp implementations (a few ulps): FLOAT32_ULPS = 16.

"Magnitude" is |value| for products and the sum of the absolute terms where a sum may cancel (shift added to a
modulated row, silu's derivative, sums over tokens in the gradients), as a rounding error scales with the terms.
RoPE involves no reduction and no transcendental: it is bitwise the reference. Token sampling compares tokens
exactly wherever float32 rounding cannot decide them (see the sampling section).
"""

import importlib
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusers_hart import ops
from diffusers_hart.ops import dispatch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOW_PRECISION_ULPS = 4
FLOAT32_ULPS = 16
PACKAGE = Path(ops.__file__).resolve().parents[1]


# --- fixtures and helpers ---------------------------------------------------------------------------------------


def _skip_interpreted_bf16(dtype):
    if dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("Triton's interpreter casts float32 to bfloat16 by truncation, not round-to-nearest-even, so "
                    "rounding-exact comparisons cannot hold there; bfloat16 runs on the GPU")


def _ulps(dtype) -> int:
    return FLOAT32_ULPS if dtype == torch.float32 else LOW_PRECISION_ULPS


def assert_within_ulps(actual, expected, ulps, dtype, magnitude=None, what=""):
    """|actual - expected| <= ulps * eps(dtype) * magnitude + ulps * (the dtype's subnormal spacing)."""
    finfo = torch.finfo(dtype)
    actual, expected = actual.double(), expected.double()
    magnitude = expected.abs() if magnitude is None else torch.as_tensor(magnitude).double()
    bound = ulps * finfo.eps * magnitude + ulps * finfo.smallest_normal * finfo.eps
    excess = (actual - expected).abs() - bound
    worst = excess.argmax()
    assert excess.max() <= 0, (
        f"{what}: |diff| {(actual - expected).abs().flatten()[worst]:.3e} exceeds {bound.flatten()[worst]:.3e} "
        f"({ulps} ulps of {dtype}) at flat index {worst.item()}"
    )


def _randn(*shape, dtype, device, scale=1.0, generator):
    return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)


# --- RMSNorm and RMSNorm + modulation ---------------------------------------------------------------------------

NORM_SHAPES = [(2, 1, 40), (2, 7, 40), (1, 7, 100), (2, 3, 1536)]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_reference(kernels, shape, dtype):
    _skip_interpreted_bf16(dtype)
    g = torch.Generator().manual_seed(0)
    x = _randn(*shape, dtype=dtype, device=kernels, scale=3.0, generator=g).requires_grad_()
    weight = _randn(shape[-1], dtype=dtype, device=kernels, generator=g).requires_grad_()
    dy = _randn(*shape, dtype=dtype, device=kernels, generator=g)

    out = ops.rms_norm(x, weight, 1e-6)
    ref = ops.rms_norm_reference(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert_within_ulps(out, ref, _ulps(dtype), dtype, what="rms_norm")

    dx, dw = torch.autograd.grad(out, (x, weight), dy)
    dx_ref, dw_ref = torch.autograd.grad(ref, (x, weight), dy)
    # dx = rstd * (dn - n * mean(dn * n)) may cancel: errors scale with the row's largest gradient
    assert_within_ulps(dx, dx_ref, _ulps(dtype), dtype, dx_ref.abs().amax(-1, keepdim=True), "rms_norm dx")
    normed = ops.rms_norm_reference(x.detach(), torch.ones_like(weight), 1e-6).float()
    dw_terms = (dy.float() * normed).abs().flatten(0, -2).sum(0)  # dw sums dy * normed over every token
    assert_within_ulps(dw, dw_ref, _ulps(dtype), dtype, dw_terms, "rms_norm dweight")


def test_rms_norm_any_leading_dims_and_strides(kernels):
    g = torch.Generator().manual_seed(1)
    x = _randn(3, 2, 5, 40, dtype=torch.float32, device=kernels, generator=g).transpose(0, 1)  # not contiguous
    weight = _randn(40, dtype=torch.float32, device=kernels, generator=g)
    out = ops.rms_norm(x, weight, 1e-5)
    assert_within_ulps(out, ops.rms_norm_reference(x, weight, 1e-5), FLOAT32_ULPS, torch.float32, what="strided")


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_modulate_matches_reference(kernels, shape, dtype):
    _skip_interpreted_bf16(dtype)
    g = torch.Generator().manual_seed(2)
    B, L, C = shape
    x = _randn(B, L, C, dtype=dtype, device=kernels, scale=3.0, generator=g).requires_grad_()
    weight = _randn(C, dtype=dtype, device=kernels, generator=g).requires_grad_()
    # scale and shift as the blocks slice them: (B, 6, C) -> unsqueeze -> unbind, so their batch stride is 6C
    modulation = _randn(B, 6, C, dtype=dtype, device=kernels, scale=0.5, generator=g).requires_grad_()
    scale, shift = modulation.unsqueeze(2).unbind(1)[2:4]
    dy = _randn(B, L, C, dtype=dtype, device=kernels, generator=g)

    out = ops.rms_norm_modulate(x, weight, 1e-6, scale, shift)
    ref = ops.rms_norm_modulate_reference(x, weight, 1e-6, scale, shift)
    y_norm = ops.rms_norm_reference(x, weight, 1e-6).detach().float()
    one_plus = (1 + scale.detach().float()).abs()
    assert_within_ulps(out, ref, _ulps(dtype), dtype, y_norm.abs() * one_plus + shift.detach().float().abs(), "out")

    grads = torch.autograd.grad(out, (x, weight, modulation), dy)
    grads_ref = torch.autograd.grad(ref, (x, weight, modulation), dy)
    dy_f = dy.float()
    normed = ops.rms_norm_reference(x.detach(), torch.ones_like(weight), 1e-6).float()
    g_mod = dy_f * one_plus  # the gradient reaching the norm
    dmod_terms = torch.zeros(B, 6, C, device=kernels)
    dmod_terms[:, 2] = (dy_f * y_norm).abs().sum(1)  # dscale sums dy * y_norm over the tokens
    dmod_terms[:, 3] = dy_f.abs().sum(1)  # dshift sums dy
    magnitudes = [grads_ref[0].abs().amax(-1, keepdim=True), (g_mod * normed).abs().flatten(0, 1).sum(0), dmod_terms]
    for name, got, want, magnitude in zip(("dx", "dweight", "dmodulation"), grads, grads_ref, magnitudes):
        assert_within_ulps(got, want, _ulps(dtype), dtype, magnitude, name)


def test_rms_norm_modulate_checks_shapes():
    x = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 1, 8\)"):
        ops.rms_norm_modulate(x, torch.ones(8), 1e-6, torch.zeros(2, 8), torch.zeros(2, 1, 8))
    with pytest.raises(ValueError, match=r"\(B, L, C\)"):
        ops.rms_norm_modulate(x[0], torch.ones(8), 1e-6, torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))


def test_rms_norm_host_checks(kernels):
    from diffusers_hart.ops.kernels.rms_norm import rms_norm_modulate_forward

    x = torch.zeros(2, 3, 8, device=kernels)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm_modulate_forward(x, torch.ones(7, device=kernels), 1e-6)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rms_norm_modulate_forward(x.transpose(1, 2), torch.ones(3, device=kernels), 1e-6)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        rms_norm_modulate_forward(x.double(), torch.ones(8, device=kernels), 1e-6)
    with pytest.raises(ValueError, match="both scale and shift"):
        rms_norm_modulate_forward(x, torch.ones(8, device=kernels), 1e-6, torch.zeros(2, 1, 8, device=kernels))


# --- RoPE -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,H,L,c", [(2, 3, 1, 8), (2, 3, 7, 40), (1, 24, 5, 64)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_is_bitwise_the_reference(kernels, B, H, L, c, dtype):
    """No reduction, no transcendental, contraction off: every product and sum rounds as the torch ops round."""
    _skip_interpreted_bf16(dtype)
    g = torch.Generator().manual_seed(3)
    # query and key as the attention slices them out of one (B, L, 3, H, c) projection: strided, last dim dense
    qkv = _randn(B, L, 3, H, c, dtype=dtype, device=kernels, generator=g)
    query, key, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    query, key = query.detach().requires_grad_(), key.detach().requires_grad_()
    angles = torch.rand(B, L, c, generator=g).to(kernels) * 100
    cos, sin = angles.cos(), angles.sin()  # float32, halves not equal: the kernel must not assume they are
    dq, dk = _randn(B, H, L, c, dtype=dtype, device=kernels, generator=g), _randn(B, H, L, c, dtype=dtype, device=kernels, generator=g)

    out = ops.apply_rotary_emb(query, key, cos, sin)
    ref = ops.apply_rotary_emb_reference(query, key, cos, sin)
    for got, want in zip(out, ref):
        assert got.dtype == dtype and torch.equal(got, want)
    grads = torch.autograd.grad(out, (query, key), (dq, dk))
    grads_ref = torch.autograd.grad(ref, (query, key), (dq, dk))
    for got, want in zip(grads, grads_ref):
        assert torch.equal(got, want)


def test_rotary_table_shared_by_the_batch(kernels):
    g = torch.Generator().manual_seed(4)
    query, key = (_randn(3, 2, 7, 16, dtype=torch.float16, device=kernels, generator=g) for _ in range(2))
    angles = torch.rand(1, 7, 16, generator=g).to(kernels)
    out = ops.apply_rotary_emb(query, key, angles.cos(), angles.sin())
    ref = ops.apply_rotary_emb_reference(query, key, angles.cos(), angles.sin())
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_rotary_host_checks(kernels):
    from diffusers_hart.ops.kernels.rotary import rotary_apply

    q = torch.zeros(2, 3, 5, 8, device=kernels)
    table = torch.zeros(2, 5, 8, device=kernels)
    with pytest.raises(ValueError, match="must match query"):
        rotary_apply(q, torch.zeros(2, 3, 4, 8, device=kernels), table, table)
    with pytest.raises(ValueError, match="even head_dim"):
        rotary_apply(q[..., :7].contiguous(), q[..., :7].contiguous(), table[..., :7].contiguous(),
                     table[..., :7].contiguous())
    with pytest.raises(ValueError, match=r"cos must have shape"):
        rotary_apply(q, q, torch.zeros(5, 8, device=kernels), table)


# --- SwiGLU -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 40), (2, 7, 100), (3, 1536)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_matches_reference(kernels, shape, dtype):
    _skip_interpreted_bf16(dtype)
    g = torch.Generator().manual_seed(5)
    gate = _randn(*shape, dtype=dtype, device=kernels, scale=2.0, generator=g).requires_grad_()
    up = _randn(*shape, dtype=dtype, device=kernels, generator=g).requires_grad_()
    dy = _randn(*shape, dtype=dtype, device=kernels, generator=g)

    out = ops.swiglu(gate, up)
    ref = ops.swiglu_reference(gate, up)
    assert_within_ulps(out, ref, _ulps(dtype), dtype, what="swiglu")
    dgate, dup = torch.autograd.grad(out, (gate, up), dy)
    dgate_ref, dup_ref = torch.autograd.grad(ref, (gate, up), dy)
    assert_within_ulps(dup, dup_ref, _ulps(dtype), dtype, what="dup")
    # silu'(x) = s (1 + x (1 - s)) crosses zero near x = -1.28: the error scales with its terms
    x, s = gate.detach().float(), torch.sigmoid(gate.detach().float())
    magnitude = (dy.float() * up.detach().float()).abs() * s * (1 + x.abs() * (1 - s))
    assert_within_ulps(dgate, dgate_ref, _ulps(dtype), dtype, magnitude, "dgate")


def test_swiglu_checks_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ops.swiglu(torch.zeros(2, 3), torch.zeros(2, 4))


# --- token sampling ---------------------------------------------------------------------------------------------
#
# The kernel and the reference get the same uniforms (and gumbel noise). The CFG mix and top-k are exact in both;
# the top-p cut and the inverse-CDF draw compare float32 sums accumulated in different orders. Those sums differ
# by a few float32 roundings of the total (~1e-7 each), so a row is decided identically unless a cumulative sum
# lies within that of its threshold. Rows whose float64 margin is under SUM_MARGIN (~170 float32 ulps of the total
# mass, far above the observed sum differences) are left out of the comparison, and the test checks they are rare.

SUM_MARGIN = 1e-5


def _margins(mixed, top_k, top_p, uniform=None):
    """Per row, the float64 distance of the top-p cumsums and of the draw's target (if any) from their thresholds."""
    x = ops.top_k_top_p_filter_reference(mixed.double(), top_k, 0.0)
    margin = torch.full(mixed.shape[:-1], math.inf, dtype=torch.float64, device=mixed.device)
    if top_p > 0:
        cumsum = x.sort(dim=-1).values.softmax(dim=-1).cumsum(dim=-1)
        margin = (cumsum - (1 - top_p)).abs().amin(dim=-1)
        x = ops.top_k_top_p_filter_reference(x, 0, top_p)
    if uniform is not None:
        cdf = x.softmax(dim=-1).cumsum(dim=-1)
        margin = torch.minimum(margin, (cdf - uniform.double().unsqueeze(-1)).abs().amin(dim=-1))
    return margin


def _logits_case(B, l, V, guided, generator, device, scale=3.0):
    rows = 2 * B if guided else B
    logits = _randn(rows, l, V, dtype=torch.float32, device=device, scale=scale, generator=generator)
    uniform = torch.rand(B, l, generator=generator).to(device)
    gumbel = -torch.empty(B, l, V).exponential_(generator=generator).log().to(device)
    return logits, uniform, gumbel


@pytest.mark.parametrize(
    "B,l,V,top_k,top_p,guidance",
    [
        (2, 1, 100, 0, 0.0, 4.5),  # stage 0: one token per image, no filter
        (2, 4, 300, 20, 0.0, 2.0),  # top-k only (HART's default)
        (1, 5, 300, 0, 0.8, None),  # top-p only, unguided
        (2, 4, 4096, 600, 0.9, 1.5),  # HART's vocabulary and first-stage k, with a nucleus too
    ],
    ids=str,
)
def test_sample_tokens_matches_reference(kernels, B, l, V, top_k, top_p, guidance):
    g = torch.Generator().manual_seed(6)
    logits, uniform, gumbel = _logits_case(B, l, V, guidance is not None, g, kernels)
    smooth_scale, temperature = 1.3, 0.2  # HART's schedule: 1 + ratio, max(0.27 * (1 - 0.95 ratio), 0.005)
    tokens, weights = ops.sample_tokens(logits, top_k, top_p, uniform, guidance, gumbel, smooth_scale, temperature)
    tokens_ref, weights_ref = ops.sample_tokens_reference(
        logits, top_k, top_p, uniform, guidance, gumbel, smooth_scale, temperature
    )
    assert tokens.dtype == torch.int64 and tokens.shape == (B, l)

    mixed = logits.float() if guidance is None else ops.cfg_mix(logits.float(), guidance)
    decided = _margins(mixed, top_k, top_p, uniform) > SUM_MARGIN
    assert decided.float().mean() >= 0.9, "too many rows on a rounding boundary for the test to mean anything"
    assert torch.equal(tokens[decided], tokens_ref[decided])

    # weights: softmax of y = (x * scale + g) / T; an error of one ulp of |y| in an exponent moves the weight by that
    # much relative, so the bound scales with the largest finite |y| of the row (large at HART's low temperatures)
    y = ((ops.top_k_top_p_filter_reference(mixed, top_k, top_p) * smooth_scale + gumbel) / temperature)
    y_max = torch.where(y.isfinite(), y.abs(), 0).amax(-1, keepdim=True)
    rows = decided.unsqueeze(-1).expand_as(weights)  # a top-p cut on the boundary changes the weights' support
    assert_within_ulps(weights[rows], weights_ref[rows], FLOAT32_ULPS, torch.float32,
                       (weights_ref.abs() * (1 + y_max))[rows], "smooth weights")  # fmt: skip


def test_sample_tokens_without_smoothing_and_strided_logits(kernels):
    g = torch.Generator().manual_seed(7)
    logits, uniform, _ = _logits_case(2, 9, 300, True, g, kernels)
    last = logits[:, -1:]  # stage 0 takes the last text token's logits: a strided (2B, 1, V) view
    tokens, weights = ops.sample_tokens(last, 30, 0.0, uniform[:, :1], guidance_scale=3.0)
    tokens_ref, _ = ops.sample_tokens_reference(last, 30, 0.0, uniform[:, :1], guidance_scale=3.0)
    assert weights is None and torch.equal(tokens, tokens_ref)


def test_cfg_mix_is_bitwise(kernels):
    """Contraction off: (1 + t) * cond - t * uncond rounds its two products and the difference like torch."""
    from diffusers_hart.ops.kernels.sampling import fused_sample

    g = torch.Generator().manual_seed(8)
    logits, _, _ = _logits_case(3, 5, 257, True, g, kernels, scale=10.0)
    for t in (0.0, 0.3, 4.5 * 12 / 13):
        filtered = fused_sample(logits, 0, 0.0, guidance_scale=t, return_filtered=True)[2]
        assert torch.equal(filtered, ops.cfg_mix(logits, t))


@pytest.mark.parametrize("top_k", [1, 7, 50, 299])
def test_top_k_ties_are_exact(kernels, top_k):
    """Integer logits tie everywhere: every logit equal to the k-th largest stays, as the reference's `<` rule."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randint(-4, 5, (3, 4, 300), generator=g).float().to(kernels)
    logits[0, 0, :10] = float("-inf")  # masked entries are values too
    logits[0, 1, 5] = -0.0  # -0.0 and 0.0 compare equal
    assert torch.equal(ops.top_k_top_p_filter(logits, top_k, 0.0), ops.top_k_top_p_filter_reference(logits, top_k, 0.0))


def test_top_p_ties_keep_the_whole_boundary_group(kernels):
    """At the nucleus boundary the reference keeps the part of a tie group its sort puts last; the kernel keeps the
    whole group: a superset, larger only by logits equal to the reference's smallest kept one."""
    g = torch.Generator().manual_seed(10)
    logits = torch.randint(-6, 3, (4, 3, 300), generator=g).float().to(kernels)
    for top_p in (0.3, 0.7, 0.95):
        fused = ops.top_k_top_p_filter(logits, 0, top_p).isfinite()
        ref_out = ops.top_k_top_p_filter_reference(logits, 0, top_p)
        ref = ref_out.isfinite()
        assert not (ref & ~fused).any()
        boundary = torch.where(ref, ref_out, math.inf).amin(-1, keepdim=True)
        assert torch.equal(logits[fused & ~ref], boundary.expand_as(logits)[fused & ~ref])


def test_top_k_top_p_filter_without_ties(kernels):
    g = torch.Generator().manual_seed(11)
    logits = _randn(2, 3, 500, dtype=torch.float32, device=kernels, scale=2.0, generator=g)
    for top_k, top_p in ((0, 0.0), (40, 0.0), (0, 0.5), (100, 0.9), (500, 0.2)):
        got = ops.top_k_top_p_filter(logits, top_k, top_p)
        want = ops.top_k_top_p_filter_reference(logits, top_k, top_p)
        decided = _margins(logits, top_k, top_p) > SUM_MARGIN
        assert decided.float().mean() >= 0.9 and torch.equal(got[decided], want[decided]), (top_k, top_p)


def test_sampled_tokens_follow_the_probabilities(kernels):
    """The inverse-CDF draw is a multinomial draw: N evenly spread uniforms (i + 1/2) / N pick token j for
    N * p_j of them, up to one at either end of its interval."""
    n = 200
    logits = torch.tensor([[[2.0, 0.0, 1.0, -1.0, 0.5, -30.0]]], device=kernels).expand(1, n, 6).contiguous()
    uniform = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).float().view(1, n).to(kernels)
    tokens, _ = ops.sample_tokens(logits, 0, 0.0, uniform)
    counts = torch.bincount(tokens.flatten().cpu(), minlength=6).double()
    probs = logits[0, 0].double().softmax(-1).cpu()
    assert (counts - n * probs).abs().max() <= 1
    assert torch.equal(tokens, tokens.sort(dim=-1).values)  # increasing uniforms pick non-decreasing tokens


def test_sample_tokens_checks_shapes():
    logits = torch.zeros(4, 3, 10)
    with pytest.raises(ValueError, match=r"uniform must have shape \(2, 3\)"):
        ops.sample_tokens(logits, 0, 0.0, torch.zeros(4, 3), guidance_scale=1.0)
    with pytest.raises(ValueError, match="even count"):
        ops.sample_tokens(logits[:3], 0, 0.0, torch.zeros(1, 3), guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"gumbel must have shape \(4, 3, 10\)"):
        ops.sample_tokens(logits, 0, 0.0, torch.zeros(4, 3), gumbel_BlV=torch.zeros(4, 3, 9))


def test_filter_reference_is_the_pipelines():
    """The ops reference keeps the semantics of the pipeline's filter (the CPU path reproducing the original)."""
    from diffusers_hart.pipelines.hart.sampling import top_k_top_p_filter as pipeline_filter

    g = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 5, 300, generator=g) * 3
    for top_k, top_p in ((0, 0.0), (50, 0.0), (0, 0.6), (50, 0.9)):
        assert torch.equal(ops.top_k_top_p_filter_reference(logits, top_k, top_p), pipeline_filter(logits, top_k, top_p))


# --- dispatch (no triton needed) --------------------------------------------------------------------------------


@pytest.fixture
def triton_importable(monkeypatch):
    """Pretend `import triton` works, to test the other rules on any machine."""
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.delenv(dispatch.DISABLE_TRITON_ENV, raising=False)
    monkeypatch.delenv(dispatch.TRITON_INTERPRET_ENV, raising=False)
    return monkeypatch


def test_cpu_tensors_take_torch_unless_interpreting(triton_importable):
    x = torch.zeros(2, 3)
    assert not dispatch.use_fused(x)
    triton_importable.setenv(dispatch.TRITON_INTERPRET_ENV, "1")
    assert dispatch.use_fused(x)


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_env_var_forces_torch(triton_importable, value):
    triton_importable.setenv(dispatch.TRITON_INTERPRET_ENV, "1")
    triton_importable.setenv(dispatch.DISABLE_TRITON_ENV, value)
    assert not dispatch.use_fused(torch.zeros(2, 3))


def test_env_var_zero_keeps_fused(triton_importable):
    triton_importable.setenv(dispatch.TRITON_INTERPRET_ENV, "1")
    triton_importable.setenv(dispatch.DISABLE_TRITON_ENV, "0")
    assert dispatch.use_fused(torch.zeros(2, 3))


def test_dtypes_devices_and_availability(triton_importable):
    triton_importable.setenv(dispatch.TRITON_INTERPRET_ENV, "1")
    assert all(dispatch.use_fused(torch.zeros(2, dtype=d)) for d in DTYPES)
    assert not dispatch.use_fused(torch.zeros(2, dtype=torch.float64))
    assert not dispatch.use_fused(torch.zeros(2), torch.zeros(2, dtype=torch.int64))
    assert dispatch.use_fused(torch.zeros(2), None)  # optional tensors are ignored
    assert not dispatch.use_fused(None)
    assert not dispatch.use_fused(torch.zeros(2, device="meta"))
    assert not dispatch.use_fused(torch.zeros(2), torch.zeros(2, device="meta"))
    triton_importable.setattr(dispatch, "triton_available", lambda: False)
    assert not dispatch.use_fused(torch.zeros(2))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_tensors_take_the_kernels(triton_importable):
    assert dispatch.use_fused(torch.zeros(2, device="cuda"))
    triton_importable.setenv(dispatch.DISABLE_TRITON_ENV, "1")
    assert not dispatch.use_fused(torch.zeros(2, device="cuda"))


def test_disabled_ops_are_the_references(triton_importable):
    """With the env var set every op is its torch reference, bit for bit."""
    triton_importable.setenv(dispatch.TRITON_INTERPRET_ENV, "1")
    triton_importable.setenv(dispatch.DISABLE_TRITON_ENV, "1")
    g = torch.Generator().manual_seed(14)
    x, w = torch.randn(2, 3, 8, generator=g), torch.randn(8, generator=g)
    scale, shift = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), ops.rms_norm_reference(x, w, 1e-6))
    assert torch.equal(ops.rms_norm_modulate(x, w, 1e-6, scale, shift),
                       ops.modulate(ops.rms_norm_reference(x, w, 1e-6), scale, shift))
    assert torch.equal(ops.swiglu(x, w.expand_as(x)), F.silu(x) * w)


def test_triton_is_imported_only_by_the_kernels():
    """`pip install diffusers_hart` without triton must work: only ops/kernels may import it (lazily, at that)."""
    pattern = re.compile(r"^\s*(import triton|from triton)\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if pattern.search(path.read_text()) and "ops/kernels" not in path.as_posix()
    ]
    assert offenders == []


def test_ops_work_when_triton_cannot_be_imported():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from diffusers_hart.ops import dispatch, rms_norm, rms_norm_reference\n"
        "x = torch.randn(2, 8)\n"
        "assert not dispatch.triton_available() and not dispatch.use_fused(x)\n"
        "assert torch.equal(rms_norm(x, torch.ones(8), 1e-6), rms_norm_reference(x, torch.ones(8), 1e-6))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")  # even when asked to interpret
    env.pop(dispatch.DISABLE_TRITON_ENV, None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=PACKAGE.parent)
