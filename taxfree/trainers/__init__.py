"""Our own trainers for alignment methods TRL does not have, on transformers' Trainer."""

from taxfree.trainers.config import ContrastiveConfig, contrastive_methods
from taxfree.trainers.contrastive import ContrastiveTrainer
from taxfree.trainers.data import (
    ContrastiveCollator,
    record_format,
    tokenize_dataset,
    tokenize_prompt_completions,
)

__all__ = [
    "ContrastiveCollator",
    "ContrastiveConfig",
    "ContrastiveTrainer",
    "contrastive_methods",
    "record_format",
    "tokenize_dataset",
    "tokenize_prompt_completions",
]
