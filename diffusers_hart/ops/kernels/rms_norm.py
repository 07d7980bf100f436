"""Fused RMSNorm, optionally followed by the AdaLN modulation `* (1 + scale) + shift`, forward and backward.

One program per row in the forward; the backward's programs each loop over a chunk of rows of one batch entry so
that the weight, scale and shift gradients are summed in registers and written once per program (partial sums that
the host adds up), as Liger-Kernel's RMSNorm does for the weight.

Rounding mirrors the torch reference op by op: statistics in float32, the normalised row rounded to the input
dtype *before* the weight multiply (the original's CUDA kernel does so), then every product and sum of the modulation
rounded to the input dtype as torch's separate elementwise ops round them. The backward mirrors the roundings of
torch's autograd of that reference too, so both differ only by float32 summation order.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    EXACT,
    check_float,
    check_last_dim_contiguous,
    device_guard,
    program_count,
    row_block,
    warps_for,
)


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, SCALE, SHIFT, Y, RSTD,
    L, C,
    stride_xb, stride_xl, stride_yb, stride_yl, stride_mb,
    eps,
    HAS_MOD: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: B * L * C can pass 2**31 at 1024px with a large batch
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    dtype = Y.dtype.element_ty

    x = tl.load(X + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    tl.store(RSTD + row, rstd)  # the backward reuses it instead of reducing the row again

    normed = (x * rstd).to(dtype).to(tl.float32)  # rounded before the weight multiply, as the reference
    w = tl.load(W + cols, mask=mask, other=0.0).to(dtype).to(tl.float32)
    y = normed * w
    if HAS_MOD:
        y = y.to(dtype).to(tl.float32)
        scale = tl.load(SCALE + b * stride_mb + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + b * stride_mb + cols, mask=mask, other=0.0).to(tl.float32)
        one_plus_scale = (1.0 + scale).to(dtype).to(tl.float32)
        y = (y * one_plus_scale).to(dtype).to(tl.float32) + shift
    tl.store(Y + b * stride_yb + l * stride_yl + cols, y.to(dtype), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, SCALE, RSTD, DX, DW_PART, DSCALE_PART, DSHIFT_PART,
    L, C, rows_per_program,
    stride_dyb, stride_dyl, stride_xb, stride_xl, stride_dxb, stride_dxl, stride_mb,
    HAS_MOD: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    part = b * tl.num_programs(1) + chunk
    l_start = chunk * rows_per_program
    l_end = tl.minimum(l_start + rows_per_program, L)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    dtype = DX.dtype.element_ty

    w = tl.load(W + cols, mask=mask, other=0.0).to(dtype).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_MOD:
        scale = tl.load(SCALE + b * stride_mb + cols, mask=mask, other=0.0).to(tl.float32)
        one_plus_scale = (1.0 + scale).to(dtype).to(tl.float32)
        dscale_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        dshift_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)

    for l in range(l_start, l_end):
        x = tl.load(X + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + b * stride_dyb + l * stride_dyl + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + b * L + l)
        normed = x * rstd
        normed_rounded = normed.to(dtype).to(tl.float32)
        if HAS_MOD:
            # y = y_norm * (1 + scale) + shift: torch's mul backward rounds each product to the dtype
            y_norm = (normed_rounded * w).to(dtype).to(tl.float32)
            dshift_acc += dy
            dscale_acc += (dy * y_norm).to(dtype).to(tl.float32)
            grad = (dy * one_plus_scale).to(dtype).to(tl.float32)
        else:
            grad = dy
        dw_acc += (grad * normed_rounded).to(dtype).to(tl.float32)
        dnormed = (grad * w).to(dtype).to(tl.float32)
        # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (dn - n * mean(dn * n))
        dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / C))
        tl.store(DX + b * stride_dxb + l * stride_dxl + cols, dx.to(dtype), mask=mask)

    tl.store(DW_PART + part * C + cols, dw_acc, mask=mask)
    if HAS_MOD:
        tl.store(DSCALE_PART + part * C + cols, dscale_acc, mask=mask)
        tl.store(DSHIFT_PART + part * C + cols, dshift_acc, mask=mask)


def _as_rows(name: str, tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(..., C) -> (1, N, C) view when the leading dims collapse (else a copy): the kernels address (b, l) rows."""
    check_last_dim_contiguous(name, tensor)
    return tensor.reshape(1, -1, width)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, scale, shift) -> None:
    check_float("x", x)
    check_float("weight", weight)
    C = x.shape[-1]
    if weight.shape != (C,):
        raise ValueError(f"weight must have shape ({C},) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}.")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}.")
    check_last_dim_contiguous("weight", weight)
    check_last_dim_contiguous("x", x)
    if (scale is None) != (shift is None):
        raise ValueError("pass both scale and shift, or neither.")
    if scale is not None:
        if x.dim() != 3:
            raise ValueError(f"modulated RMSNorm takes x of shape (B, L, C), got {tuple(x.shape)}.")
        B = x.shape[0]
        for name, t in (("scale", scale), ("shift", shift)):
            if t.shape != (B, 1, C):
                raise ValueError(f"{name} must have shape ({B}, 1, {C}) (one row per batch entry), got {tuple(t.shape)}.")
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(f"{name} must be {x.dtype} on {x.device} like x, got {t.dtype} on {t.device}.")
            check_last_dim_contiguous(name, t)
        if scale.stride(0) != shift.stride(0):
            raise ValueError("scale and shift must share their batch stride (slices of one modulation tensor do).")


def rms_norm_modulate_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm(x, weight, eps)`, then `* (1 + scale) + shift` when given; returns (output, per-row rstd)."""
    _check_inputs(x, weight, scale, shift)
    C = x.shape[-1]
    has_mod = scale is not None
    x3 = x if has_mod else _as_rows("x", x, C)
    B, L, _ = x3.shape
    y = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    rstd = torch.empty(B * L, dtype=torch.float32, device=x.device)
    if B * L == 0:
        return y.view(x.shape), rstd
    block = row_block(C, "x")
    stride_mb = scale.stride(0) if has_mod else 0
    with device_guard(x):
        _rms_norm_fwd_kernel[(B * L,)](
            x3, weight, scale if has_mod else x3, shift if has_mod else x3, y, rstd,
            L, C, x3.stride(0), x3.stride(1), y.stride(0), y.stride(1), stride_mb, eps,
            HAS_MOD=has_mod, BLOCK_C=block, num_warps=warps_for(block), **EXACT,
        )  # fmt: skip
    return y.view(x.shape), rstd


def rms_norm_modulate_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor], rstd: torch.Tensor
):
    """Gradients (dx, dweight, dscale, dshift) of `rms_norm_modulate_forward`; dscale/dshift are None without scale."""
    C = x.shape[-1]
    has_mod = scale is not None
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    x3 = x if has_mod else _as_rows("x", x, C)
    dy3 = dy.view(x3.shape) if dy.is_contiguous() else dy.reshape(x3.shape)
    B, L, _ = x3.shape
    dx = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    chunks = max(1, min(L, triton.cdiv(program_count(x.device), B)))
    rows_per_program = triton.cdiv(L, chunks)
    chunks = triton.cdiv(L, rows_per_program)
    dw_part = torch.empty((B * chunks, C), dtype=torch.float32, device=x.device)
    dscale_part = torch.empty_like(dw_part) if has_mod else dw_part
    dshift_part = torch.empty_like(dw_part) if has_mod else dw_part
    block = row_block(C, "x")
    with device_guard(x):
        _rms_norm_bwd_kernel[(B, chunks)](
            dy3, x3, weight, scale if has_mod else x3, rstd, dx, dw_part, dscale_part, dshift_part,
            L, C, rows_per_program,
            dy3.stride(0), dy3.stride(1), x3.stride(0), x3.stride(1), dx.stride(0), dx.stride(1),
            scale.stride(0) if has_mod else 0,
            HAS_MOD=has_mod, BLOCK_C=block, num_warps=warps_for(block), **EXACT,
        )  # fmt: skip
    # torch's autograd rounds the weight gradient to x's dtype (the weight is cast to it) before the cast back
    dweight = dw_part.sum(0).to(x.dtype).to(weight.dtype)
    if not has_mod:
        return dx.view(x.shape), dweight, None, None
    dscale = dscale_part.view(B, chunks, C).sum(1, keepdim=True).to(x.dtype)
    dshift = dshift_part.view(B, chunks, C).sum(1, keepdim=True).to(x.dtype)
    return dx, dweight, dscale, dshift


class RMSNormModulateFunction(torch.autograd.Function):
    """Autograd of the fused RMSNorm (+ modulation); `scale`/`shift` may be None for a plain RMSNorm."""

    @staticmethod
    def forward(ctx, x, weight, eps, scale, shift):
        y, rstd = rms_norm_modulate_forward(x, weight, eps, scale, shift)
        ctx.save_for_backward(x, weight, scale, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale, rstd = ctx.saved_tensors
        dx, dweight, dscale, dshift = rms_norm_modulate_backward(dy, x, weight, scale, rstd)
        return dx, dweight, None, dscale, dshift
