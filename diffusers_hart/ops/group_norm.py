"""GroupNorm with float32 statistics, optionally followed by SiLU: torch reference and its dispatching entry point."""

from typing import Optional

import torch
import torch.nn.functional as F

from .checks import check_group_norm_args
from .dispatch import use_fused


def group_norm_silu_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    silu: bool,
) -> torch.Tensor:
    """The VAE's `Float32GroupNorm` (group norm computed in float32, cast back to x's dtype), then `F.silu` if asked."""
    out = F.group_norm(
        x.float(), num_groups, None if weight is None else weight.float(), None if bias is None else bias.float(), eps
    ).to(x.dtype)
    return F.silu(out) if silu else out


def _fusable_layout(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.numel() > 0 and (
        x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    )


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    silu: bool = False,
) -> torch.Tensor:
    """`F.silu(group_norm(x))` (or the group norm alone) with float32 statistics and the output in x's dtype.

    Fused on CUDA for 4-D x (N, C, H, W), contiguous or channels-last, the output keeping x's memory format; see
    `group_norm_silu_reference` for the rounding. The kernel is forward only: when autograd needs gradients (x,
    weight or bias requiring them, grad mode on) the torch reference runs, so training still gets them.
    """
    check_group_norm_args(x, num_groups, weight, bias)
    if _fusable_layout(x) and not _needs_grad(x, weight, bias) and use_fused(x, weight, bias):
        from .kernels.group_norm import group_norm_silu_forward

        weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
        return group_norm_silu_forward(x, num_groups, weight, bias, eps, silu)
    return group_norm_silu_reference(x, num_groups, weight, bias, eps, silu)
