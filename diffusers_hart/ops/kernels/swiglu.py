"""Fused SwiGLU gate `silu(gate) * up`, forward and backward (Liger-Kernel's SwiGLU, as a flat elementwise map).

The torch reference `F.silu(gate) * up` rounds silu's result to the input dtype before the product; the kernel
rounds there too. The backward recomputes silu from `gate` instead of storing it (one tensor less kept for
training) and rounds like torch's autograd: `dy * up` and `dy * silu` to the dtype, silu's derivative in float32.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import EXACT, check_float, device_guard

_BLOCK = 1024


@triton.jit
def _silu_f32(gate):
    return gate / (1.0 + tl.exp(-gate))  # torch's formula (silu_kernel): x / (1 + exp(-x))


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dtype = OUT.dtype.element_ty
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    silu = _silu_f32(gate).to(dtype).to(tl.float32)
    tl.store(OUT + offs, (silu * up).to(dtype), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, GATE, UP, DGATE, DUP, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dtype = DGATE.dtype.element_ty
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sigmoid = 1.0 / (1.0 + tl.exp(-gate))
    silu = (gate * sigmoid).to(dtype).to(tl.float32)
    dsilu = (dy * up).to(dtype).to(tl.float32)
    # torch's silu_backward: grad * sigmoid * (1 + x * (1 - sigmoid))
    dgate = dsilu * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    tl.store(DGATE + offs, dgate.to(dtype), mask=mask)
    tl.store(DUP + offs, (dy * silu).to(dtype), mask=mask)


def _check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_float("gate", gate)
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up ({tuple(up.shape)}, {up.dtype}, {up.device}) must match gate "
                         f"({tuple(gate.shape)}, {gate.dtype}, {gate.device}).")
    for name, t in (("gate", gate), ("up", up)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() first.")


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check_inputs(gate, up)
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        with device_guard(gate):
            _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=4, **EXACT)
    return out


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(gate, up)
    dy = dy.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        with device_guard(gate):
            _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dy, gate, up, dgate, dup, n, BLOCK=_BLOCK, num_warps=4,
                                                         **EXACT)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy, gate, up)
