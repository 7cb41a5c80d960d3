"""A plain loop that trains AMA's block logits (ALGORITHMS.md 4).

Objective per batch: the merged model's causal-LM loss (mean token NLL on the aligned policy's
own best responses) + `averager.regularizer()`. AdamW on the logits only, cosine schedule with
linear warmup, as in the paper (lr 2e-5 for RSF, 4e-5 for PPO/DPO; 3% warmup; 1 epoch). Works
with the averager itself or wrapped in DistributedDataParallel (gradients of the logits are
then averaged across ranks).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sized

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from taxfree.errors import TaxfreeError


def train_ama(
    averager: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    lr: float = 2e-5,
    epochs: int = 1,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    total_steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Train the logits of an AdaptiveModelAverager (or a DDP wrapper of one) in place.

    `batches`: re-iterable batches of {"input_ids", "attention_mask"?, "labels"} (labels -100 on
    prompt and padding tokens); its len() sets the schedule unless `total_steps` is given.
    Returns {"steps", "losses" (total per step), "nll", "block_weights"}.
    """
    core = averager.module if isinstance(averager, nn.parallel.DistributedDataParallel) else averager
    if lr <= 0 or epochs < 1 or not 0 <= warmup_ratio < 1:
        raise TaxfreeError(f"train_ama: need lr > 0, epochs >= 1, 0 <= warmup_ratio < 1 (got {lr}, {epochs}, {warmup_ratio})")
    if total_steps is None:
        if not isinstance(batches, Sized):
            raise TaxfreeError("train_ama: batches has no len(); pass total_steps")
        total_steps = epochs * len(batches)
    if total_steps < 1:
        raise TaxfreeError("train_ama: no batches to train on")
    params = core.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)
    device = params[0].device
    averager.train()
    losses, nlls, step = [], [], 0
    bar = tqdm(total=total_steps, desc="ama", disable=not progress)
    for _ in range(epochs):
        for batch in batches:
            if step >= total_steps:
                break
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = averager(**batch)
            loss = out.loss + core.regularizer()
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            nlls.append(out.loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return {"steps": step, "losses": losses, "nll": nlls, "block_weights": core.block_weights()}
