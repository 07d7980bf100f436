"""Training utilities: the HART transformer's training step (as a module to wrap, and its functional pieces)."""

from .losses import (
    HARTTrainingDraws,
    HARTTrainingOutput,
    TrainingRandomness,
    hart_training_outputs,
    hart_training_step,
    kept_positions_from_orders,
    last_scale_keep_from_orders,
    num_masked_last_scale,
    sample_cond_drop,
    sample_last_scale_keep,
    sample_last_scale_tokens,
    sample_mask_ratio,
    token_cross_entropy,
    token_targets,
)
from .transformer_step import HARTTransformerTrainingLosses, HARTTransformerTrainingModule

__all__ = [
    "HARTTrainingDraws",
    "HARTTrainingOutput",
    "HARTTransformerTrainingLosses",
    "HARTTransformerTrainingModule",
    "TrainingRandomness",
    "hart_training_outputs",
    "hart_training_step",
    "kept_positions_from_orders",
    "last_scale_keep_from_orders",
    "num_masked_last_scale",
    "sample_cond_drop",
    "sample_last_scale_keep",
    "sample_last_scale_tokens",
    "sample_mask_ratio",
    "token_cross_entropy",
    "token_targets",
]
