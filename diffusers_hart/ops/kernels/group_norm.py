"""Fused GroupNorm, optionally followed by SiLU, forward only (the VAE decoder's `F.silu(norm(x))`, inference).

Both kernels run one program per chunk of the H*W positions of one (image, group): a grid of N * groups * splits.

1. Statistics: a program sums its chunk for the chunk's mean, then reads the chunk again (small enough to still be
   in cache) for the sum of squared deviations from that mean, and writes (count, mean, M2). Deviations from the
   chunk's own mean do not cancel where E[x^2] - mean^2 would (activations far from zero).
2. The host combines the partials with Chan et al.'s parallel formula in float64 (tiny tensors) into each group's
   mean and rstd = 1 / sqrt(var + eps), with the biased variance as F.group_norm.
3. Apply: y = (x - mean) * rstd * w + b in float32, rounded to x's dtype as the reference's `.to(x.dtype)`; with
   SiLU, silu is computed in float32 from that rounded value, as torch computes it, and rounded again.

Elements are addressed through (stride_n, stride_c, stride_hw), so one kernel serves contiguous NCHW and
channels-last NHWC tensors; the output has x's memory format. The reference normalises as `scale * x + shift`
(scale = rstd * w): the two differ by float32 roundings and the float32 summation order only.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..checks import check_group_norm_args
from ._common import EXACT, check_float, check_last_dim_contiguous, device_guard, program_count, warps_for
from .swiglu import _silu_f32

# A program loads (BLOCK_C, BLOCK_HW) tiles of _TILE elements: BLOCK_C covers a group's channels (5 to 20 in HART's
# decoder, 32 groups), so a tile row is a contiguous run of channels in NHWC and a tile column one of positions in
# NCHW.
_TILE = 2048
_MAX_BLOCK_C = 32
# At most this many elements per statistics program, so that its second pass re-reads the chunk from cache: even
# with every SM of an H200 full (8 programs of 8 warps), the chunks in flight, 132 * 8 * 16 KiB = 17 MiB in
# bfloat16 (34 MiB in float32), fit in its 50 MiB L2. (Reasoned, not measured.)
_MAX_CHUNK = 8192


@triton.jit
def _chunk_of_program(splits, G, channels_per_group, HW, positions_per_chunk, stride_n, stride_c):
    """(image * G + group, group, offset of the group's first element, first and end position of the chunk)."""
    pid = tl.program_id(0)
    image_group = pid // splits
    group = image_group % G
    base = (image_group // G).to(tl.int64) * stride_n + (group * channels_per_group).to(tl.int64) * stride_c
    hw_start = (pid % splits) * positions_per_chunk
    hw_end = tl.minimum(hw_start + positions_per_chunk, HW)
    return image_group, group, base, hw_start, hw_end


@triton.jit
def _tile(c0, hw0, channels_per_group, hw_end, stride_c, stride_hw, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets (from the group's first element) and mask of the tile at channel c0, position hw0 of a group."""
    channels = c0 + tl.arange(0, BLOCK_C)
    positions = hw0 + tl.arange(0, BLOCK_HW)
    mask = (channels < channels_per_group)[:, None] & (positions < hw_end)[None, :]
    offsets = channels.to(tl.int64)[:, None] * stride_c + positions.to(tl.int64)[None, :] * stride_hw
    return offsets, mask


@triton.jit
def _group_norm_stats_kernel(
    X, PARTIALS,
    splits, G, channels_per_group, HW, positions_per_chunk,
    stride_n, stride_c, stride_hw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):  # fmt: skip
    _, _, base, hw_start, hw_end = _chunk_of_program(
        splits, G, channels_per_group, HW, positions_per_chunk, stride_n, stride_c
    )
    count = channels_per_group * (hw_end - hw_start)

    total = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for c0 in range(0, channels_per_group, BLOCK_C):
        for hw0 in range(hw_start, hw_end, BLOCK_HW):
            offsets, mask = _tile(c0, hw0, channels_per_group, hw_end, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
            total += tl.load(X + base + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(total) / count

    squares = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for c0 in range(0, channels_per_group, BLOCK_C):
        for hw0 in range(hw_start, hw_end, BLOCK_HW):
            offsets, mask = _tile(c0, hw0, channels_per_group, hw_end, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
            x = tl.load(X + base + offsets, mask=mask, other=0.0).to(tl.float32)
            deviation = tl.where(mask, x - mean, 0.0)
            squares += deviation * deviation

    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tl.store(PARTIALS + pid, count.to(tl.float32))  # exact: a chunk holds far fewer than 2**24 elements
    tl.store(PARTIALS + programs + pid, mean)
    tl.store(PARTIALS + 2 * programs + pid, tl.sum(squares))


@triton.jit
def _group_norm_apply_kernel(
    X, Y, MEAN, RSTD, W, B,
    splits, G, channels_per_group, HW, positions_per_chunk,
    stride_n, stride_c, stride_hw,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):  # fmt: skip
    image_group, group, base, hw_start, hw_end = _chunk_of_program(
        splits, G, channels_per_group, HW, positions_per_chunk, stride_n, stride_c
    )
    mean = tl.load(MEAN + image_group)
    rstd = tl.load(RSTD + image_group)
    dtype = Y.dtype.element_ty

    for c0 in range(0, channels_per_group, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        channel_mask = channels < channels_per_group
        if HAS_WEIGHT:
            w = tl.load(W + group * channels_per_group + channels, mask=channel_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(B + group * channels_per_group + channels, mask=channel_mask, other=0.0).to(tl.float32)
        for hw0 in range(hw_start, hw_end, BLOCK_HW):
            offsets, mask = _tile(c0, hw0, channels_per_group, hw_end, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
            x = tl.load(X + base + offsets, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y = y * w[:, None]
            if HAS_BIAS:
                y = y + b[:, None]
            y = y.to(dtype)  # the reference's .to(x.dtype)
            if SILU:
                y = _silu_f32(y.to(tl.float32)).to(dtype)
            tl.store(Y + base + offsets, y, mask=mask)


def _layout_strides(x: torch.Tensor) -> Tuple[int, int, int]:
    """(stride_n, stride_c, stride_hw) of a contiguous or channels-last (N, C, H, W) tensor.

    Derived from the layout, not read from x.stride(): torch ignores the strides of size-1 dimensions when it calls
    a tensor contiguous, so those may be anything, and H and W must merge into one position index.
    """
    _, C, H, W = x.shape
    if x.is_contiguous():
        return C * H * W, H * W, 1
    return H * W * C, 1, C


def _check_inputs(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
    check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"the fused group norm takes x of shape (N, C, H, W), got {tuple(x.shape)}.")
    check_group_norm_args(x, num_groups, weight, bias)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"x must be contiguous or channels-last, got strides {x.stride()}; call .contiguous() first.")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(name, t)
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}.")
            check_last_dim_contiguous(name, t)


def _chunking(image_groups: int, channels_per_group: int, HW: int, device: torch.device) -> Tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_HW, positions per chunk, splits): enough programs to fill the device, chunks cache-sized.

    On an H200 (528 programs fill it) at 1024x1024 with 160 channels in 32 groups and N = 1, filling needs 17 chunks
    per group and the chunk bound 586 (18752 programs); at 64x64, 16 chunks per group fill it. Under the
    interpreter (4 programs fill it) small tensors take one chunk per group.
    """
    block_c = min(triton.next_power_of_2(channels_per_group), _MAX_BLOCK_C)
    block_hw = _TILE // block_c
    splits = max(triton.cdiv(program_count(device), image_groups), triton.cdiv(channels_per_group * HW, _MAX_CHUNK))
    positions = triton.cdiv(triton.cdiv(HW, splits), block_hw) * block_hw  # whole tiles: no ragged tile mid-chunk
    return block_c, block_hw, positions, triton.cdiv(HW, positions)


def _combine_partials(partials: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each group's float32 (mean, rstd) from its chunks' (count, mean, M2), partials of shape (3, groups, splits).

    Chan et al.'s parallel formula for all chunks at once: M2 = sum(M2_k) + sum(count_k * (mean_k - mean)^2).
    """
    count, chunk_mean, chunk_m2 = partials.double().unbind(0)
    total = count.sum(1)
    mean = (count * chunk_mean).sum(1) / total
    m2 = chunk_m2.sum(1) + (count * (chunk_mean - mean[:, None]).square()).sum(1)
    rstd = torch.rsqrt(m2 / total + eps)  # biased variance, as F.group_norm
    return mean.float(), rstd.float()


def group_norm_silu_forward(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm of a contiguous or channels-last (N, C, H, W) x, then SiLU if asked; the output in x's layout."""
    _check_inputs(x, num_groups, weight, bias)
    N, C, H, W = x.shape
    out = torch.empty_like(x)  # x is dense, so empty_like copies its strides: the same addressing serves both
    if out.numel() == 0:
        return out
    HW = H * W
    channels_per_group = C // num_groups
    image_groups = N * num_groups
    strides = _layout_strides(x)
    block_c, block_hw, positions, splits = _chunking(image_groups, channels_per_group, HW, x.device)
    grid = (image_groups * splits,)
    shape_args = (splits, num_groups, channels_per_group, HW, positions, *strides)
    num_warps = warps_for(_TILE)

    partials = torch.empty((3, image_groups, splits), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _group_norm_stats_kernel[grid](
            x, partials, *shape_args, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps, **EXACT
        )
    mean, rstd = _combine_partials(partials, eps)
    with device_guard(x):
        _group_norm_apply_kernel[grid](
            x, out, mean, rstd, x if weight is None else weight, x if bias is None else bias, *shape_args,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu,
            BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps, **EXACT,
        )  # fmt: skip
    return out
