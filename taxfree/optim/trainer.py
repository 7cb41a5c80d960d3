"""Handing an already built optimizer to a transformers/TRL Trainer under every backend."""

from __future__ import annotations

from typing import Any

import torch

from taxfree.errors import TaxfreeError


class _ReturnOptimizer:
    """transformers' factory form of `optimizer_cls_and_kwargs`: the Trainer calls
    `factory()(model, **kwargs)` and gets the optimizer the stage already built."""

    def __init__(self, optimizer: torch.optim.Optimizer, fsdp1: bool = False):
        self.optimizer = optimizer
        self.fsdp1 = fsdp1

    def __call__(self):
        return self._give

    def _give(self, model, **kwargs):
        # Under FSDP1 the Trainer builds the optimizer once the model is wrapped: the moment to
        # learn which shard piece each parameter has become.
        if self.fsdp1:
            bind_fsdp1(self.optimizer, model)
        return self.optimizer


def bind_fsdp1(optimizer: torch.optim.Optimizer, model: Any) -> None:
    """`optimizer.bind_fsdp1(model)` for our optimizers, with an error when the model holds no
    FSDP1 unit over the optimizer's parameters (they would be stepped as whole tensors)."""
    bind = getattr(optimizer, "bind_fsdp1", None)
    if bind is None:
        return  # torch's own optimizers work on the pieces elementwise
    bind(model)
    if not getattr(optimizer, "_fsdp1", None):
        raise TaxfreeError(f"{type(optimizer).__name__} under FSDP1: none of its parameters is managed by an FSDP1 "
                           "unit of the model it was handed")


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

    Under FSDP1 (`use_orig_params: true`) the optimizer learns, when the Trainer asks for it
    (after wrapping), which shard piece each parameter has become (`bind_fsdp1`).

    Errors: a DeepSpeed config with its own "optimizer" section (it would replace ours)."""
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
    fsdp1 = False
    if getattr(trainer, "is_fsdp_enabled", False):
        fsdp1 = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2
    trainer.optimizer_cls_and_kwargs = (_ReturnOptimizer(optimizer, fsdp1=fsdp1), {})
