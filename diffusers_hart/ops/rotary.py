from typing import Tuple

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_emb(
    query_BHLc: torch.Tensor, key_BHLc: torch.Tensor, cos_BLc: torch.Tensor, sin_BLc: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by `(cos, sin)` of shape (B, L, head_dim), pairing dim j with j + head_dim/2."""
    cos, sin = cos_BLc.unsqueeze(1), sin_BLc.unsqueeze(1)
    return query_BHLc * cos + _rotate_half(query_BHLc) * sin, key_BHLc * cos + _rotate_half(key_BHLc) * sin
