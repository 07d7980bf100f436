"""The fused GroupNorm (+ SiLU) kernel against its torch reference, its fallbacks, and its dispatch.

Kernel tests run on CUDA when there is a GPU, else in Triton's interpreter (the `kernels` fixture), as in test_ops,
whose helpers this file imports (pytest puts tests/ on sys.path).

Tolerance. Both paths compute y = (x - mean) * rstd * w + b in float32 over a group of n = (C / G) * H * W values,
in different orders: the kernel sums tiles of chunks and combines the chunks in float64; the reference uses torch's
own reduction and computes y as scale * x + (b - scale * mean) with scale = rstd * w. With eps32 the float32
epsilon and "terms" M = (|x| + mean of |x| over the group) * rstd * |w| + |b| (every value either path rounds is at
most M; a sum that may cancel errs relative to its terms, not its result), each path is within, of exact arithmetic:

* the mean: log2(n) + 1 roundings of the sum of |x| (tree-like orders), so (log2(n) + 1) eps32 M in y;
* rstd: the sum of n squares, log2(n) + 2 roundings relative, halved by the square root, plus 2 (eps, rsqrt);
* the elementwise part: 4 roundings of at most M.

So the two paths' float32 values differ by at most 2 * (1.5 log2(n) + 8) = 3 log2(n) + 16 ulps of M
(`_float32_ulps`). SiLU multiplies a difference by at most max |silu'| < 1.1 and adds its own three roundings (exp,
1 + ., the division). float32 outputs are compared with exactly that bound. float16/bfloat16 outputs add the
roundings to the dtype (|round(a) - round(b)| <= |a - b| + one ulp): one ulp of |y| for the norm, and through SiLU
1.1 of that plus one ulp of |silu(y)| <= |y|, 2.1 ulps of |y| in all.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_ops import _randn, _skip_interpreted_bf16, assert_within_ulps

from diffusers_hart import ops
from diffusers_hart.ops import dispatch
from diffusers_hart.ops import group_norm as group_norm_module

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
EPS = 1e-6  # the VAE's
GROUPS = 8
SHAPES = [(1, 40, 13, 11), (3, 40, 1, 37)]  # 5 channels per group, H * W = 143 and 37: no block divides them
# 5 * 45 * 41 = 9225 values per group: more than one chunk even in the interpreter, so Chan's combine runs
CHUNKED_SHAPE = (1, 40, 45, 41)


def _float32_ulps(n: int, silu: bool) -> float:
    ulps = 3 * math.log2(n) + 16
    return 1.1 * ulps + 3 if silu else ulps


def _terms(x, weight, bias):
    """M = (|x| + mean |x| of the group) * rstd * |w| + |b| per element, in float64 (see the module docstring)."""
    N, C = x.shape[:2]
    groups = x.double().reshape(N, GROUPS, -1)
    rstd = (groups.var(-1, unbiased=False) + EPS).rsqrt()

    def per_channel(per_group):
        return per_group.repeat_interleave(C // GROUPS, 1).view(N, C, 1, 1)

    w = 1.0 if weight is None else weight.double().abs().view(C, 1, 1)
    b = 0.0 if bias is None else bias.double().abs().view(C, 1, 1)
    return (x.double().abs() + per_channel(groups.abs().mean(-1))) * per_channel(rstd) * w + b


def assert_matches_reference(out, ref, x, weight, bias, silu, what):
    """|out - ref| within the module docstring's bound: float32 differences of M, then the dtype's roundings."""
    dtype = x.dtype
    n = x[0].numel() // GROUPS
    terms = _terms(x, weight, bias)
    float32_ulps = _float32_ulps(n, silu)
    if dtype == torch.float32:
        assert_within_ulps(out, ref, float32_ulps, dtype, terms, what)
        return
    rounding_ulps = 2.1 if silu else 1.0
    y_ref = ops.group_norm_silu_reference(x, GROUPS, weight, bias, EPS, silu=False)
    # one bound in ulps of the output dtype: the float32 part re-expressed in that dtype's epsilon
    eps_ratio = torch.finfo(torch.float32).eps / torch.finfo(dtype).eps
    magnitude = y_ref.double().abs() + terms * (float32_ulps * eps_ratio / rounding_ulps)
    assert_within_ulps(out, ref, rounding_ulps, dtype, magnitude, what)


def _case(shape, dtype, memory_format, device, affine, seed, offset=0.0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (_randn(*shape, dtype=torch.float32, device=device, scale=scale, generator=g) + offset).to(dtype)
    x = x.contiguous(memory_format=memory_format)
    if not affine:
        return x, None, None
    C = shape[1]
    # parameters in x's dtype, as in a model cast to it (test_group_norm_mixed_parameter_dtypes: float32 ones)
    weight = _randn(C, dtype=dtype, device=device, generator=g)
    bias = _randn(C, dtype=dtype, device=device, generator=g)
    return x, weight, bias


@pytest.fixture
def reference_calls(monkeypatch):
    """Records the calls of the entry point's fallback, to tell which path an input took."""
    calls = []
    reference = group_norm_module.group_norm_silu_reference

    def spy(*args):
        calls.append(args)
        return reference(*args)

    monkeypatch.setattr(group_norm_module, "group_norm_silu_reference", spy)
    return calls


# --- the kernel against the reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("silu", [False, True], ids=["norm", "silu"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_matches_reference(kernels, reference_calls, shape, dtype, layout, affine, silu):
    _skip_interpreted_bf16(dtype)
    memory_format = FORMATS[layout]
    x, weight, bias = _case(shape, dtype, memory_format, kernels, affine, seed=0)

    out = ops.group_norm_silu(x, GROUPS, weight, bias, EPS, silu)
    assert not reference_calls, "the fused path should have run"
    ref = ops.group_norm_silu_reference(x, GROUPS, weight, bias, EPS, silu)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=memory_format) and out.stride() == x.stride()
    assert_matches_reference(out, ref, x, weight, bias, silu, f"group_norm {layout}")


@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_group_norm_combines_chunks(kernels, dtype, layout):
    from diffusers_hart.ops.kernels.group_norm import _chunking

    N, C, H, W = CHUNKED_SHAPE
    assert _chunking(N * GROUPS, C // GROUPS, H * W, torch.device(kernels))[3] > 1
    x, weight, bias = _case(CHUNKED_SHAPE, dtype, FORMATS[layout], kernels, affine=True, seed=1)
    out = ops.group_norm_silu(x, GROUPS, weight, bias, EPS, silu=True)
    ref = ops.group_norm_silu_reference(x, GROUPS, weight, bias, EPS, silu=True)
    assert_matches_reference(out, ref, x, weight, bias, True, f"chunked {layout}")


@pytest.mark.parametrize("layout", FORMATS)
def test_group_norm_far_from_zero(kernels, layout):
    """x = 1000 + noise of 0.1: E[x^2] - mean^2 cancels ~8 digits, more than float32 has. The kernel's per-chunk
    deviations do not, and it stays within the bound; a float32 sum-of-squares variance misses it by far."""
    x, weight, bias = _case(CHUNKED_SHAPE, torch.float32, FORMATS[layout], kernels, affine=True, seed=2,
                            offset=1000.0, scale=0.1)  # fmt: skip
    out = ops.group_norm_silu(x, GROUPS, weight, bias, EPS)
    # The reference of a contiguous copy: torch's CPU kernel for channels-last input computes E[x^2] - mean^2 itself
    # (off by 1e3 here); its contiguous kernel does not, and on CUDA torch makes every input contiguous first.
    ref = ops.group_norm_silu_reference(x.contiguous(), GROUPS, weight, bias, EPS, silu=False)
    assert_matches_reference(out, ref, x, weight, bias, False, "offset")

    N, C = x.shape[:2]
    groups = x.reshape(N, GROUPS, -1)
    mean = groups.mean(-1, keepdim=True)
    naive_var = (groups * groups).mean(-1, keepdim=True) - mean * mean
    naive = ((groups - mean) * (naive_var + EPS).rsqrt()).view_as(x) * weight.view(C, 1, 1) + bias.view(C, 1, 1)
    with pytest.raises(AssertionError):
        assert_matches_reference(naive, ref, x, weight, bias, False, "naive variance")


def test_group_norm_mixed_parameter_dtypes(kernels):
    """Float32GroupNorm may hold float32 parameters in a half-precision model: the reference casts them to float32."""
    x, weight, bias = _case(SHAPES[0], torch.float16, torch.channels_last, kernels, affine=True, seed=3)
    weight, bias = weight.float(), bias.float()
    out = ops.group_norm_silu(x, GROUPS, weight, bias, EPS, silu=True)
    assert out.dtype == torch.float16
    ref = ops.group_norm_silu_reference(x, GROUPS, weight, bias, EPS, silu=True)
    assert_matches_reference(out, ref, x, weight, bias, True, "float32 parameters")


# --- fallbacks and dispatch -------------------------------------------------------------------------------------


def test_group_norm_gradients_take_the_reference(kernels, reference_calls):
    """The kernel has no backward: with grad mode on and a tensor requiring grad, the reference runs."""
    x, weight, bias = _case(SHAPES[0], torch.float32, torch.channels_last, kernels, affine=True, seed=4)
    for needs_grad in (x, weight, bias):
        needs_grad.requires_grad_()
        out = ops.group_norm_silu(x, GROUPS, weight, bias, EPS, silu=True)
        assert len(reference_calls) == 1 and out.requires_grad
        reference_calls.clear()
        needs_grad.requires_grad_(False)

    x.requires_grad_()
    out = ops.group_norm_silu(x, GROUPS, weight, bias, EPS, silu=True)
    (dx,) = torch.autograd.grad(out.sum(), x)
    (dx_ref,) = torch.autograd.grad(ops.group_norm_silu_reference(x, GROUPS, weight, bias, EPS, True).sum(), x)
    assert torch.equal(dx, dx_ref)
    reference_calls.clear()

    with torch.no_grad():  # inference with parameters that require grad (a model's) stays fused
        ops.group_norm_silu(x, GROUPS, weight.requires_grad_(), bias, EPS, silu=True)
    assert not reference_calls


def test_group_norm_other_layouts_take_the_reference(kernels, reference_calls):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(40, generator=g)
    for x in (
        torch.randn(2, 40, 7, generator=g),  # (N, C, L): not 4-D
        torch.randn(2, 40, 7, 5, generator=g).transpose(2, 3),  # strided: neither layout
        torch.randn(0, 40, 7, 5),  # empty
    ):
        out = ops.group_norm_silu(x, GROUPS, weight, None, EPS, silu=True)
        assert len(reference_calls) == 1
        assert torch.equal(out, ops.group_norm_silu_reference(x, GROUPS, weight, None, EPS, True))
        reference_calls.clear()


def test_group_norm_dispatch(monkeypatch, reference_calls):
    """CPU tensors take the reference unless interpreting; DIFFUSERS_HART_DISABLE_TRITON=1 forces it always."""
    monkeypatch.delenv(dispatch.DISABLE_TRITON_ENV, raising=False)
    monkeypatch.delenv(dispatch.TRITON_INTERPRET_ENV, raising=False)
    x = torch.randn(1, 40, 3, 5)
    out = ops.group_norm_silu(x, GROUPS, silu=True)
    assert len(reference_calls) == 1
    assert torch.equal(out, F.silu(F.group_norm(x, GROUPS, eps=EPS)))

    monkeypatch.setenv(dispatch.TRITON_INTERPRET_ENV, "1")
    monkeypatch.setenv(dispatch.DISABLE_TRITON_ENV, "1")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    ops.group_norm_silu(x.contiguous(memory_format=torch.channels_last), GROUPS)
    assert len(reference_calls) == 2


def test_group_norm_checks_inputs():
    x = torch.zeros(2, 40, 3, 3)
    with pytest.raises(ValueError, match=r"num_groups=6 must divide the 40 channels"):
        ops.group_norm_silu(x, 6)
    with pytest.raises(ValueError, match=r"weight must have shape \(40,\)"):
        ops.group_norm_silu(x, GROUPS, torch.ones(8))
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        ops.group_norm_silu(x, GROUPS, torch.ones(40), torch.ones(40, 1))
    with pytest.raises(ValueError, match=r"\(N, C, \.\.\.\)"):
        ops.group_norm_silu(torch.zeros(40), GROUPS)


def test_group_norm_host_checks(kernels):
    from diffusers_hart.ops.kernels.group_norm import group_norm_silu_forward

    x = torch.zeros(2, 40, 3, 5, device=kernels)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        group_norm_silu_forward(x[..., 0], GROUPS)
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        group_norm_silu_forward(x.transpose(2, 3), GROUPS)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        group_norm_silu_forward(x.double(), GROUPS)
    with pytest.raises(ValueError, match="must divide"):
        group_norm_silu_forward(x, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(40,\)"):
        group_norm_silu_forward(x, GROUPS, torch.ones(39, device=kernels))
    with pytest.raises(ValueError, match="weight must have a contiguous last dimension"):
        group_norm_silu_forward(x, GROUPS, torch.ones(80, device=kernels)[::2])


# --- the VAE runs it --------------------------------------------------------------------------------------------


def test_vae_decode_runs_the_fused_norm(kernels, reference_calls, monkeypatch):
    """Every group norm of a decode (each followed by SiLU but the attention block's) takes the kernel, and the
    image stays within float32 reach of the torch decode. This decoder chains 14 norms, each within
    3 log2(n) + 16 < 40 float32 ulps (5e-6) of its terms (above), with convolutions of gain about 1 between them at
    initialisation: 14 x 5e-6 = 7e-5 of the image's scale, bounded at 1e-4 (1.3e-6 observed)."""
    from diffusers_hart import HARTAutoEncoder
    from diffusers_hart.ops.kernels import group_norm as kernel_module

    torch.manual_seed(0)
    vae = HARTAutoEncoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, vocab_size=32, patch_nums=(1, 2))
    vae = vae.to(kernels).eval()
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(kernels)
    fused_calls = []
    forward = kernel_module.group_norm_silu_forward
    monkeypatch.setattr(kernel_module, "group_norm_silu_forward", lambda *a: fused_calls.append(a[-1]) or forward(*a))
    with torch.no_grad():
        fused = vae.decode(latents).sample
        assert not reference_calls and True in fused_calls and False in fused_calls
        monkeypatch.setenv(dispatch.DISABLE_TRITON_ENV, "1")
        reference = vae.decode(latents).sample
    assert len(reference_calls) == len(fused_calls)
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-4 * reference.abs().max().item())
