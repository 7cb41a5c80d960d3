"""What every training stage's section shares: one Trainer run and its optimizer.

The `optimizer:` section is made from the optimizer registry (taxfree.optim.registry): `name`,
the union of every registered optimizer's hyperparameters with their declared defaults and
ranges, and the two models that define tau. A stage's section subclasses TrainConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from taxfree.optim.registry import all_hyperparameters, optimizer_names, optimizer_spec
from taxfree.pipeline.paths import is_model_ref
from taxfree.pipeline.schema import check_params, param_fields, require


def _check_optimizer(self) -> None:
    check_params(self, all_hyperparameters().values())
    for key in ("ref", "base"):
        value = getattr(self, key)
        require(is_model_ref(value), key, f"model directory not found: {value}")


def settings_of(section) -> dict:
    """The chosen optimizer's own hyperparameters from an `optimizer:` section (what it is built with)."""
    return {p.name: getattr(section, p.name) for p in optimizer_spec(section.name).all_hyperparameters}


OptimizerConfig = dataclasses.make_dataclass(
    "OptimizerConfig",
    [("name", Literal[optimizer_names()], field(default="adamw"))]
    + param_fields(all_hyperparameters().values())
    # Models defining tau = ref - base; null = taken from the run (ref = SFT output, base = the
    # model SFT started from).
    + [("ref", str | None, field(default=None)), ("base", str | None, field(default=None))],
    namespace={
        "check": _check_optimizer,
        "__doc__": "Which optimizer a training stage uses and its hyperparameters (taxfree.optim.registry); "
                   "an optimizer ignores the others' settings.",
        "__module__": __name__,
    },
)


@dataclass
class TrainConfig:
    """What every training stage shares; one Trainer run."""

    epochs: float = 1.0
    max_steps: int = -1  # -1: train `epochs`; N >= 1: stop after N optimizer steps
    lr: float = 1e-5
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 8
    eval_batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 512
    # Over-long examples are cut (TRL keeps their start) unless false: then they are an error.
    truncation: bool = True
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    eval_steps: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    dataloader_workers: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def check(self):
        require(self.lr > 0, "lr", "must be > 0")
        require(self.max_steps == -1 or self.max_steps >= 1, "max_steps",
                f"{self.max_steps}: must be -1 (train by epochs) or a number of steps >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        require(self.max_length >= 8, "max_length", "must be >= 8")
        require(self.epochs > 0 or self.max_steps > 0, "epochs", "must be > 0 (or set max_steps)")
        require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.save_steps >= 1, "save_steps", "must be >= 1")
        require(self.logging_steps >= 1, "logging_steps", "must be >= 1")
