"""RMSNorm and RMSNorm followed by AdaLN modulation: torch references and their dispatching entry points."""

import torch

from .dispatch import MAX_FUSED_ROW, use_fused
from .modulate import modulate


def rms_norm_reference(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back, then scaled by `weight`.

    The cast happens *before* the weight multiply, as in the original's fused CUDA kernel,
    so low-precision outputs round exactly where the original's do.
    """
    x_f32 = hidden_states.float()
    normed = x_f32 * torch.rsqrt(x_f32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(hidden_states.dtype) * weight.to(hidden_states.dtype)


def rms_norm_modulate_reference(
    hidden_states_BLC: torch.Tensor, weight: torch.Tensor, eps: float, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor
) -> torch.Tensor:
    """`modulate(rms_norm(x, weight, eps), scale, shift)` with torch ops."""
    return modulate(rms_norm_reference(hidden_states_BLC, weight, eps), scale_B1C, shift_B1C)


def _fusable_row(hidden_states: torch.Tensor) -> bool:
    return hidden_states.numel() > 0 and hidden_states.shape[-1] <= MAX_FUSED_ROW


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (see `rms_norm_reference` for the rounding); fused on CUDA, with a backward."""
    if _fusable_row(hidden_states) and use_fused(hidden_states, weight):
        from .kernels.rms_norm import RMSNormModulateFunction

        if hidden_states.stride(-1) != 1:
            hidden_states = hidden_states.contiguous()
        return RMSNormModulateFunction.apply(hidden_states, weight.contiguous(), eps, None, None)
    return rms_norm_reference(hidden_states, weight, eps)


def rms_norm_modulate(
    hidden_states_BLC: torch.Tensor, weight: torch.Tensor, eps: float, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor
) -> torch.Tensor:
    """`modulate(rms_norm(x, weight, eps), scale, shift)`: x of shape (B, L, C), scale and shift (B, 1, C).

    One fused kernel (forward and backward) on CUDA instead of an RMSNorm and three elementwise ops; it rounds
    where the torch ops do. Scale and shift of another dtype than x (type promotion would change the output dtype)
    take the torch path.
    """
    x = hidden_states_BLC
    if x.dim() != 3:
        raise ValueError(f"rms_norm_modulate takes hidden states of shape (B, L, C), got {tuple(x.shape)}.")
    B, _, C = x.shape
    for name, t in (("scale", scale_B1C), ("shift", shift_B1C)):
        if t.shape != (B, 1, C):
            raise ValueError(f"{name} must have shape ({B}, 1, {C}), one row per batch entry; got {tuple(t.shape)}.")
    same_dtype = scale_B1C.dtype == shift_B1C.dtype == x.dtype
    if same_dtype and _fusable_row(x) and use_fused(x, weight, scale_B1C, shift_B1C):
        from .kernels.rms_norm import RMSNormModulateFunction

        x, scale, shift = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, scale_B1C, shift_B1C))
        if scale.stride(0) != shift.stride(0):
            scale, shift = scale.contiguous(), shift.contiguous()
        return RMSNormModulateFunction.apply(x, weight.contiguous(), eps, scale, shift)
    return modulate(rms_norm(x, weight, eps), scale_B1C, shift_B1C)
