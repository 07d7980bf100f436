# Copyright 2025 The HART authors and The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""HART's residual diffusion head: a per-token MLP denoiser with AdaLN conditioning (MAR's "SimpleMLPAdaLN")."""

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ..ops import modulate
from .normalization import Float32LayerNorm


class HARTResidualBlock(nn.Module):
    """Pre-norm MLP block whose norm shift/scale and output gate come from the conditioning embedding."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Float32LayerNorm(channels, eps=1e-6)
        self.linear_1 = nn.Linear(channels, channels)
        self.linear_2 = nn.Linear(channels, channels)
        self.modulation = nn.Linear(channels, 3 * channels)

    def forward(self, hidden_states: torch.Tensor, activated_emb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(activated_emb).chunk(3, dim=-1)
        residual = self.linear_2(F.silu(self.linear_1(modulate(self.norm(hidden_states), scale, shift))))
        return hidden_states + gate * residual


class HARTResidualDiffusionMLP(nn.Module):
    """
    Denoiser of HART's residual tokens: predicts epsilon and a learned variance per token, conditioned on the
    transformer's hidden state of that token and on the diffusion timestep.

    Args:
        in_channels (`int`): Channels of a residual token (the tokenizer's latent channels).
        model_channels (`int`): Width of the MLP.
        out_channels (`int`): Output channels, `2 * in_channels` (epsilon and variance).
        condition_channels (`int`): Width of the transformer's condition vectors.
        num_res_blocks (`int`): Number of AdaLN residual blocks.
    """

    def __init__(
        self, in_channels: int, model_channels: int, out_channels: int, condition_channels: int, num_res_blocks: int
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        # cos-first sinusoid with frequencies exp(-ln(1e4) * i / 128), as in DiT/MAR.
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(256, model_channels)
        self.condition_proj = nn.Linear(condition_channels, model_channels)
        self.proj_in = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([HARTResidualBlock(model_channels) for _ in range(num_res_blocks)])
        self.norm_out = Float32LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(model_channels, 2 * model_channels)
        self.proj_out = nn.Linear(model_channels, out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Training-from-scratch init: Xavier linears, small timestep MLP, and zeroed modulations and output, so every
        block starts as the identity and the head starts by predicting zeros."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embedding.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embedding.linear_2.weight, std=0.02)
        for layer in [block.modulation for block in self.res_blocks] + [self.modulation_out, self.proj_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """
        Args:
            sample (`torch.Tensor` of shape `(N, in_channels)`): Noisy residual tokens.
            timestep (`torch.Tensor` of shape `(N,)`): Original (un-respaced) diffusion timesteps.
            condition (`torch.Tensor` of shape `(N, condition_channels)`): Per-token conditions.

        Returns:
            `torch.Tensor` of shape `(N, out_channels)`: epsilon followed by the variance interpolation values.
        """
        hidden_states = self.proj_in(sample)
        emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype)) + self.condition_proj(condition)
        # Every modulation applies SiLU to the same embedding; do it once.
        activated_emb = F.silu(emb)
        for block in self.res_blocks:
            hidden_states = block(hidden_states, activated_emb)
        shift, scale = self.modulation_out(activated_emb).chunk(2, dim=-1)
        return self.proj_out(modulate(self.norm_out(hidden_states), scale, shift))
