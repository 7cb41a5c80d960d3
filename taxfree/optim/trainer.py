"""Handing an already built optimizer to a transformers/TRL Trainer under every backend."""

from __future__ import annotations

from typing import Any

import torch

from taxfree.errors import TaxfreeError


class _ReturnOptimizer:
    """transformers' factory form of `optimizer_cls_and_kwargs`: the Trainer calls
    `factory()(model, **kwargs)` and gets the optimizer the stage already built."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def __call__(self):
        return lambda model, **kwargs: self.optimizer


def hand_optimizer_to_trainer(trainer: Any, optimizer: torch.optim.Optimizer | None) -> None:
    """Make a transformers/TRL Trainer train with `optimizer` under every backend.

    `Trainer(optimizers=(opt, sched))` does not: under DeepSpeed transformers drops the optimizer
    (`deepspeed_init` sets `trainer.optimizer = None`) and silently builds its default AdamW, and
    under FSDP it refuses `optimizers=`. Here the Trainer's optimizer factory
    (`optimizer_cls_and_kwargs`) is set to return ours: DeepSpeed then wraps it as the ZeRO
    basic optimizer, accelerate's FSDP2 preparation swaps in the sharded tensors (the optimizer
    adopts them), and without either it is used as it is. Construct the trainer with
    `optimizers=(None, None)` (or with the optimizer, except under FSDP), then call this before
    `train()`. A scheduler is then built by the Trainer from `lr_scheduler_type`.

    Errors: a DeepSpeed config with its own "optimizer" section (it would replace ours), and
    FSDP1 (it would hand the optimizer flattened shard pieces; use FSDP2 or ZeRO)."""
    if optimizer is None:
        return
    if getattr(trainer, "is_deepspeed_enabled", False):
        config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        if "optimizer" in config:
            raise TaxfreeError(
                f"the DeepSpeed config has an \"optimizer\" section "
                f"({config['optimizer'].get('type')}): remove it to train with "
                f"{type(optimizer).__name__}"
            )
    if getattr(trainer, "is_fsdp_enabled", False):
        version = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise TaxfreeError(
                f"{type(optimizer).__name__} under FSDP1: the optimizer would see 1-D shard pieces "
                "of the tensors; use FSDP2 (fsdp_version: 2) or DeepSpeed ZeRO"
            )
    trainer.optimizer_cls_and_kwargs = (_ReturnOptimizer(optimizer), {})
