"""Group and layer norms that compute in float32 whatever the model's dtype.

A half-precision model rounds every op; the norms' mean and variance, reduced over thousands of values, are where
rounding hurts most (some CPU kernels reduce in the input dtype). The original runs under float16 autocast, which
computes `group_norm` and `layer_norm` in float32 too. In a float32 model these are the plain norms.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def _float_or_none(tensor):
    return None if tensor is None else tensor.float()


class Float32GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(x.float(), self.num_groups, _float_or_none(self.weight), _float_or_none(self.bias), self.eps)
        return out.to(x.dtype)


class Float32LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(
            x.float(), self.normalized_shape, _float_or_none(self.weight), _float_or_none(self.bias), self.eps
        )
        return out.to(x.dtype)
