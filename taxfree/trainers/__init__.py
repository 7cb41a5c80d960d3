"""Our own trainers for alignment methods TRL does not have, on transformers' Trainer."""

from taxfree.trainers.config import CONTRASTIVE_TRAINER_LOSSES, PAIRWISE_LOSSES, ContrastiveConfig
from taxfree.trainers.contrastive import ContrastiveTrainer
from taxfree.trainers.data import (
    ContrastiveCollator,
    record_format,
    tokenize_dataset,
    tokenize_prompt_completions,
)

__all__ = [
    "CONTRASTIVE_TRAINER_LOSSES",
    "PAIRWISE_LOSSES",
    "ContrastiveCollator",
    "ContrastiveConfig",
    "ContrastiveTrainer",
    "record_format",
    "tokenize_dataset",
    "tokenize_prompt_completions",
]
