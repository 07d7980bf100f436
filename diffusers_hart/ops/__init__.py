"""Numerical building blocks shared by the HART models.

Each op has one entry point here. The torch implementations are the reference every
fused kernel is tested against; fused versions plug in behind the same functions.
"""

from .modulate import modulate
from .rms_norm import rms_norm
from .rotary import apply_rotary_emb

__all__ = ["apply_rotary_emb", "modulate", "rms_norm"]
