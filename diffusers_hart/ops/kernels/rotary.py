"""Fused rotate-half RoPE of queries and keys in one launch, forward and backward.

One program per (batch, position): it loads that position's cos/sin row once and rotates every head of the query
and of the key. Math in float32 with the tables as given (float32 in HART), rounded once to the input dtype.
With floating-point contraction off, each product and sum rounds as the reference's separate torch ops do, so the
output is bitwise the reference's.

Pairing: dim j < c/2 with j + c/2. With x1, x2 the halves and (c1, c2), (s1, s2) the halves of the tables:
    out1 = x1 * c1 - x2 * s1        out2 = x2 * c2 + x1 * s2
The backward is the transpose of that map, which is the same map with (s1, s2) replaced by (-s2, -s1):
    dx1 = dy1 * c1 + dy2 * s2       dx2 = dy2 * c2 - dy1 * s1
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import EXACT, check_float, check_last_dim_contiguous, device_guard

# Heads x half-dims per tile: 32 x 32 float32 values (HART: 24 heads of 64 dims) is a handful of registers a thread.
_MAX_TILE = 4096


@triton.jit
def _rotate_heads(
    X, OUT, b, l, H, half,
    stride_xb, stride_xh, stride_xl, stride_ob, stride_oh, stride_ol,
    c1, c2, s1, s2,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < half
    for h0 in range(0, H, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)[:, None]
        mask = (heads < H) & dim_mask
        x_ptr = X + b * stride_xb + l * stride_xl + heads * stride_xh + dims
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * c1 - x2 * s1
        out2 = x2 * c2 + x1 * s2
        o_ptr = OUT + b * stride_ob + l * stride_ol + heads * stride_oh + dims
        tl.store(o_ptr, out1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(o_ptr + half, out2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, QO, KO,
    L, HQ, HK, half,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_qob, stride_qoh, stride_qol, stride_kob, stride_koh, stride_kol,
    stride_cb, stride_cl, stride_sb, stride_sl,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // L
    l = pid % L
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < half
    cos_ptr = COS + b * stride_cb + l * stride_cl + dims
    sin_ptr = SIN + b * stride_sb + l * stride_sl + dims
    c1 = tl.load(cos_ptr, mask=dim_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + half, mask=dim_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr, mask=dim_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + half, mask=dim_mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose: swap the sine halves and negate them (negation is exact)
        s1, s2 = -s2, -s1
    _rotate_heads(Q, QO, b, l, HQ, half, stride_qb, stride_qh, stride_ql, stride_qob, stride_qoh, stride_qol,
                  c1, c2, s1, s2, BLOCK_H, BLOCK_HALF)
    _rotate_heads(K, KO, b, l, HK, half, stride_kb, stride_kh, stride_kl, stride_kob, stride_koh, stride_kol,
                  c1, c2, s1, s2, BLOCK_H, BLOCK_HALF)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, t in (("query", q), ("key", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, head_dim), got {tuple(t.shape)}.")
        check_float(name, t)
        check_last_dim_contiguous(name, t)
    B, _, L, c = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, L, c):
        raise ValueError(f"key {tuple(k.shape)} must match query {tuple(q.shape)} in batch, length and head_dim.")
    if k.dtype != q.dtype:
        raise ValueError(f"query and key must share a dtype, got {q.dtype} and {k.dtype}.")
    if c % 2:
        raise ValueError(f"rotate-half RoPE needs an even head_dim, got {c}.")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (L, c):
            raise ValueError(f"{name} must have shape ({B} or 1, {L}, {c}), got {tuple(t.shape)}.")
        check_float(name, t)
        check_last_dim_contiguous(name, t)
    for name, t in (("key", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but query is on {q.device}.")


def rotary_apply(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (B, H, L, c) by tables (B or 1, L, c); `backward=True` applies the transposed rotation."""
    _check_inputs(q, k, cos, sin)
    B, HQ, L, c = q.shape
    HK = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko
    half = c // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(HQ, HK)), _MAX_TILE // block_half))
    # a table shared by the batch (B == 1) is read with batch stride 0
    cos_sb = cos.stride(0) if cos.shape[0] == B else 0
    sin_sb = sin.stride(0) if sin.shape[0] == B else 0
    with device_guard(q):
        _rotary_kernel[(B * L,)](
            q, k, cos, sin, qo, ko, L, HQ, HK, half,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
            cos_sb, cos.stride(1), sin_sb, sin.stride(1),
            BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4, **EXACT,
        )  # fmt: skip
    return qo, ko


class RotaryFunction(torch.autograd.Function):
    """Autograd of the fused RoPE for queries and keys; the tables get no gradient (they are position functions)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_apply(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        dq, dk = rotary_apply(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None
