import torch


def modulate(hidden_states: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation `x * (1 + scale) + shift` (scale and shift broadcast over the tokens)."""
    return hidden_states * (1 + scale) + shift
