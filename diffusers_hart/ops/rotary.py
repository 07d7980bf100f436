"""Rotate-half RoPE of queries and keys: torch reference and its dispatching entry point."""

from typing import Tuple

import torch

from .dispatch import use_fused


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_emb_reference(
    query_BHLc: torch.Tensor, key_BHLc: torch.Tensor, cos_BLc: torch.Tensor, sin_BLc: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by `(cos, sin)` of shape (B, L, head_dim), pairing dim j with j + head_dim/2.

    The tables stay float32 and the rotation runs in float32, as in the original (its tables are never cast):
    queries and keys are rounded to the model dtype once, after the rotation, not also through rounded
    cos/sin entries. The rotated tensors come back in the input dtype.
    """
    cos, sin = cos_BLc.unsqueeze(1), sin_BLc.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_f32 = x.float()
        return (x_f32 * cos + _rotate_half(x_f32) * sin).to(x.dtype)

    return rotate(query_BHLc), rotate(key_BHLc)


def apply_rotary_emb(
    query_BHLc: torch.Tensor, key_BHLc: torch.Tensor, cos_BLc: torch.Tensor, sin_BLc: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary_emb_reference`, as one fused launch for queries and keys on CUDA (bitwise the same result).

    The fused path differentiates queries and keys only; tables that require grad take the torch path.
    """
    q, k, cos, sin = query_BHLc, key_BHLc, cos_BLc, sin_BLc
    fusable = (
        q.dim() == 4 and k.dim() == 4 and q.dtype == k.dtype and q.numel() > 0
        and not (cos.requires_grad or sin.requires_grad)
    )  # fmt: skip
    if fusable and use_fused(q, k, cos, sin):
        from .kernels.rotary import RotaryFunction

        q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
        return RotaryFunction.apply(q, k, cos, sin)
    return apply_rotary_emb_reference(query_BHLc, key_BHLc, cos_BLc, sin_BLc)
