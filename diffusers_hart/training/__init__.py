"""Training utilities: one HART transformer training step's outputs and losses."""

from .losses import (
    HARTTrainingDraws,
    HARTTrainingOutput,
    hart_training_outputs,
    last_scale_keep_from_orders,
    sample_cond_drop,
    sample_last_scale_keep,
    sample_last_scale_tokens,
    sample_mask_ratio,
    token_cross_entropy,
    token_targets,
)

__all__ = [
    "HARTTrainingDraws",
    "HARTTrainingOutput",
    "hart_training_outputs",
    "last_scale_keep_from_orders",
    "sample_cond_drop",
    "sample_last_scale_keep",
    "sample_last_scale_tokens",
    "sample_mask_ratio",
    "token_cross_entropy",
    "token_targets",
]
