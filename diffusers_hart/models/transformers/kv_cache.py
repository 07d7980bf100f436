from typing import List, Tuple

import torch


class HARTKVCache:
    """Key/value cache of all layers, preallocated for the whole token pyramid.

    It is passed to `HARTTransformer2DModel.forward` and returned in its output instead of
    living on the attention modules, so one model can serve several generations and every
    stage sees buffers of a fixed size.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        device=None,
        dtype=None,
    ):
        shape = (batch_size, num_heads, max_length, head_dim)
        self.keys: List[torch.Tensor] = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values: List[torch.Tensor] = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0
        self.max_length = max_length

    def update(
        self, layer_index: int, key: torch.Tensor, value: torch.Tensor, store: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (B, H, L, c) of a layer so far, this stage's (B, H, l, c) included.

        With `store=False` (the last stage, which no later stage reads) this stage's are joined to the cached ones
        without being written, so the cache needs no room for them.
        """
        if not store:
            cached = slice(0, self.length)
            return (
                torch.cat((self.keys[layer_index][:, :, cached], key), dim=2),
                torch.cat((self.values[layer_index][:, :, cached], value), dim=2),
            )
        end = self.length + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} tokens for a cache of {self.max_length}")
        self.keys[layer_index][:, :, self.length : end] = key
        self.values[layer_index][:, :, self.length : end] = value
        return self.keys[layer_index][:, :, :end], self.values[layer_index][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Commit the stage just processed by every layer."""
        self.length += num_tokens
