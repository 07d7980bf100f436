"""Position and level embeddings of the HART transformer."""

from typing import Sequence, Tuple

import torch
import torch.nn as nn
from diffusers.models.embeddings import TimestepEmbedding, Timesteps


def _inverse_frequencies(head_dim: int, step: int, theta: float, device) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, step, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rotary_1d(position_ids_BL: torch.Tensor, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Llama 1-D RoPE tables (B, L, head_dim) for the text-context tokens."""
    inv_freq = _inverse_frequencies(head_dim, 2, theta, position_ids_BL.device)
    freqs = position_ids_BL.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotary_2d(positions_BL2: torch.Tensor, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE tables (B, L, head_dim) for image tokens at (row, col) positions.

    Layout: [row·f, row·f, col·f, col·f] with head_dim/4 frequencies f, so the usual
    `rotate_half` pairs each row-frequency dim with a column-frequency dim, as the original does.
    """
    inv_freq = _inverse_frequencies(head_dim, 4, theta, positions_BL2.device)
    row = positions_BL2[..., 0:1].float() * inv_freq
    col = positions_BL2[..., 1:2].float() * inv_freq
    emb = torch.cat((row, row, col, col), dim=-1)
    return emb.cos(), emb.sin()


def image_token_grid(patch_nums: Sequence[int]) -> Tuple[torch.LongTensor, torch.LongTensor]:
    """Integer (row, col) of every image token of scales 1.. as (L_img, 2), and the side of its scale as (L_img,).

    Kept as integers so that a model cast to float16 does not round them; see `image_token_positions`.
    """
    grids, sides = [], []
    for pn in patch_nums[1:]:
        axis = torch.arange(pn)
        grids.append(torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2))
        sides.append(torch.full((pn * pn,), pn))
    return torch.cat(grids), torch.cat(sides)


def image_token_positions(grid_L2: torch.LongTensor, side_L: torch.LongTensor, last_side: int) -> torch.Tensor:
    """(row, col) of image tokens in the coordinates of the last scale, as float32 (L, 2).

    A pn x pn scale samples the same image area as the last scale, so its grid is
    stretched by pn_last / pn (pn=3 of 8 gives 0, 2.667, 5.333).
    """
    return grid_L2 / side_L[:, None] * last_side


class HARTLevelEmbedding(nn.Module):
    """Embedding of the scale (level) a token belongs to; context tokens are level 0.

    Either a table (`nn.Embedding`) or, with `sinusoidal=True`, a timestep-style sinusoid
    of the level id followed by an MLP.
    """

    def __init__(self, num_levels: int, dim: int, sinusoidal: bool):
        super().__init__()
        self.sinusoidal = sinusoidal
        if sinusoidal:
            self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embedding = TimestepEmbedding(256, dim)
        else:
            self.table = nn.Embedding(num_levels, dim)

    def forward(self, level_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Embeddings of `level_ids` in `dtype`, the model's compute dtype (which the weights' storage dtype need not be)."""
        if not self.sinusoidal:
            return self.table(level_ids)
        return self.time_embedding(self.time_proj(level_ids).to(dtype))
