"""Group and layer norms that compute in float32 whatever the model's dtype.

A half-precision model rounds every op; the norms' mean and variance, reduced over thousands of values, are where
rounding hurts most (some CPU kernels reduce in the input dtype). The original runs under float16 autocast, which
computes `group_norm` and `layer_norm` in float32 too. In a float32 model these are the plain norms.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import group_norm_silu


def _float_or_none(tensor):
    return None if tensor is None else tensor.float()


class Float32GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` with float32 statistics, and SiLU after it on request (`silu=True`): one fused pass over the
    activations on CUDA, in either memory format (`ops.group_norm_silu`; the torch reference elsewhere)."""

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps, silu)


class Float32LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(
            x.float(), self.normalized_shape, _float_or_none(self.weight), _float_or_none(self.bias), self.eps
        )
        return out.to(x.dtype)
