"""Argument checks that an op's entry point and its kernel's host function share, so both paths fail alike.

Triton-free: the entry points import it on every machine, the kernels (which import triton) from below.
"""

from typing import Optional

import torch


def check_group_norm_args(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]
) -> None:
    """Shape checks shared by the entry point and the kernel's host function, so both paths fail alike."""
    if x.dim() < 2:
        raise ValueError(f"group norm takes x of shape (N, C, ...), got {tuple(x.shape)}.")
    C = x.shape[1]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {C} channels of x {tuple(x.shape)}.")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},), one value per channel of x {tuple(x.shape)}; "
                             f"got {tuple(t.shape)}.")
