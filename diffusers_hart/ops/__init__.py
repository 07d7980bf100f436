"""Numerical building blocks shared by the HART models, the pipeline and training.

Each op has one entry point here. It runs a fused Triton kernel where `dispatch.use_fused` allows (CUDA
tensors, triton importable, `DIFFUSERS_HART_DISABLE_TRITON` unset) and its torch reference otherwise; the
references (`*_reference`) are what every kernel is tested against. Triton is never imported at module level.
"""

from .dispatch import DISABLE_TRITON_ENV, use_fused
from .group_norm import group_norm_silu, group_norm_silu_reference
from .modulate import modulate
from .rms_norm import rms_norm, rms_norm_modulate, rms_norm_modulate_reference, rms_norm_reference
from .rotary import apply_rotary_emb, apply_rotary_emb_reference
from .sampling import (
    cfg_mix,
    inverse_cdf_sample,
    sample_tokens,
    sample_tokens_reference,
    smooth_weights,
    top_k_top_p_filter,
    top_k_top_p_filter_reference,
)
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "DISABLE_TRITON_ENV",
    "apply_rotary_emb",
    "apply_rotary_emb_reference",
    "cfg_mix",
    "group_norm_silu",
    "group_norm_silu_reference",
    "inverse_cdf_sample",
    "modulate",
    "rms_norm",
    "rms_norm_modulate",
    "rms_norm_modulate_reference",
    "rms_norm_reference",
    "sample_tokens",
    "sample_tokens_reference",
    "smooth_weights",
    "swiglu",
    "swiglu_reference",
    "top_k_top_p_filter",
    "top_k_top_p_filter_reference",
    "use_fused",
]
