"""Training arguments of ContrastiveTrainer: transformers' TrainingArguments plus the loss's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from taxfree.errors import TaxfreeError
from taxfree.losses.contrastive import EXO_PREF_EPS
from taxfree.losses.methods import TAXFREE_CONTRASTIVE, methods


def contrastive_methods() -> dict:
    """The registry's methods this trainer runs (taxfree.losses.methods)."""
    return {name: m for name, m in methods().items() if m.trainer == TAXFREE_CONTRASTIVE}


@dataclass
class ContrastiveConfig(TrainingArguments):
    """Arguments for the K-way EXO / DPO-rw losses and kto-pair (docs/algorithms.md 2).

    Inherits every TrainingArguments field (checkpointing, logging, schedules, distribution).
    `remove_unused_columns` defaults to False because the tokenised columns are not model inputs.
    """

    loss_type: str = field(
        default="exo-rw", metadata={"help": "A method of taxfree.losses.methods run by this trainer (exo-rw, kto-pair, ...)."}
    )
    beta_pi: float = field(default=0.1, metadata={"help": "Policy scale: p = softmax(beta_pi * z)."})
    beta_r: float = field(default=0.1, metadata={"help": "Reward temperature: q = softmax(r / beta_r)."})
    pref_eps: float = field(
        default=EXO_PREF_EPS, metadata={"help": "Target mass on the loser for exo-pref: q = (1 - eps, eps)."}
    )
    beta: float = field(default=0.1, metadata={"help": "kto-pair's beta (the other losses use beta_pi)."})
    temperature: float = field(
        default=1.0, metadata={"help": "Both models' logits are divided by this before log-softmax."}
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Max prompt + completion tokens; completions are cut on the right."}
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Max prompt tokens; prompts are cut on the left (their end is kept)."}
    )
    loss_params: dict | None = field(
        default=None,
        metadata={"help": "Settings of the method that are not fields here (a method declared with its own params)."},
    )
    num_completions: int | None = field(
        default=None,
        metadata={"help": "Use the first K completions of each record; None uses all (every record the same K)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the trainer's own columns are not model inputs."}
    )

    def __post_init__(self):
        ours = contrastive_methods()
        if self.loss_type not in ours:
            raise TaxfreeError(
                f"ContrastiveConfig.loss_type: unknown {self.loss_type!r}; expected one of {', '.join(ours)}"
            )
        for name in ("beta_pi", "beta_r", "beta", "temperature"):
            value = getattr(self, name)
            if not value > 0:
                raise TaxfreeError(f"ContrastiveConfig.{name} must be > 0, got {value!r}")
        if not 0.0 < self.pref_eps < 0.5:
            raise TaxfreeError(f"ContrastiveConfig.pref_eps must be in (0, 0.5), got {self.pref_eps!r}")
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TaxfreeError(f"ContrastiveConfig.{name} must be >= 1 or None, got {value!r}")
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise TaxfreeError(
                f"ContrastiveConfig.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"max_length ({self.max_length}) to leave room for the completion"
            )
        if self.num_completions is not None:
            if self.num_completions < 2:
                raise TaxfreeError(f"ContrastiveConfig.num_completions must be >= 2, got {self.num_completions}")
            if ours[self.loss_type].pairwise and self.num_completions != 2:
                raise TaxfreeError(
                    f"ContrastiveConfig.num_completions must be 2 for {self.loss_type}, got {self.num_completions}"
                )
        method = ours[self.loss_type]
        extra = dict(self.loss_params or {})
        for p in method.params:
            value = getattr(self, p.name) if hasattr(self, p.name) else extra.get(p.name, p.default)
            why = p.problem(value)
            if why is not None:
                raise TaxfreeError(f"ContrastiveConfig.{p.name} {why}")
        super().__post_init__()

    def method_settings(self) -> dict:
        """The keyword arguments of the method's loss: its declared settings, from these fields or
        `loss_params`, else their declared defaults."""
        extra = dict(self.loss_params or {})
        return {p.name: getattr(self, p.name) if hasattr(self, p.name) else extra.get(p.name, p.default)
                for p in contrastive_methods()[self.loss_type].params}
