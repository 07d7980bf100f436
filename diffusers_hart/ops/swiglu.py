"""SwiGLU gate `silu(gate) * up`: torch reference and its dispatching entry point."""

import torch
import torch.nn.functional as F

from .dispatch import use_fused


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up`, Llama's gated MLP activation."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` in one pass over memory on CUDA (forward and backward); gate and up of one shape and dtype."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape.")
    if gate.dtype == up.dtype and gate.numel() > 0 and use_fused(gate, up):
        from .kernels.swiglu import SwiGLUFunction

        return SwiGLUFunction.apply(gate.contiguous(), up.contiguous())
    return swiglu_reference(gate, up)
