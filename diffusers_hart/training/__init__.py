"""Training: the two models' steps as modules to wrap (DDP/FSDP), the accelerate loop and its checkpoints.

The trainers' entry points are `train_tokenizer.main` and `train_transformer.main` (`hart-train-tokenizer`,
`hart-train-transformer`); the shapes benchmark lives in `shapes`, `shapes_generation` and `shapes_model`.
"""

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
from .checkpointing import resolve_resume_checkpoint, save_checkpoint
from .tokenizer_step import HARTTokenizerTrainingModule
from .trainer import Trainer
from .transformer_step import (
    HARTTextEncoderTrainingModule,
    HARTTransformerTrainingLosses,
    HARTTransformerTrainingModule,
)

__all__ = [
    "HARTTextEncoderTrainingModule",
    "HARTTokenizerTrainingModule",
    "HARTTrainingDraws",
    "HARTTrainingOutput",
    "HARTTransformerTrainingLosses",
    "HARTTransformerTrainingModule",
    "Trainer",
    "TrainingRandomness",
    "hart_training_outputs",
    "hart_training_step",
    "kept_positions_from_orders",
    "last_scale_keep_from_orders",
    "num_masked_last_scale",
    "resolve_resume_checkpoint",
    "sample_cond_drop",
    "sample_last_scale_keep",
    "sample_last_scale_tokens",
    "sample_mask_ratio",
    "save_checkpoint",
    "token_cross_entropy",
    "token_targets",
]
