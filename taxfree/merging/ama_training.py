"""A plain loop that trains AMA's block logits (docs/algorithms.md 4).

Objective per batch: the merged model's causal-LM loss (mean token NLL on the aligned policy's
own best responses) + `averager.regularizer()`. AdamW on the logits only, cosine schedule with
linear warmup, as in the paper (lr 2e-5 for RSF, 4e-5 for PPO/DPO; 3% warmup; 1 epoch). Works
with the averager itself or wrapped in DistributedDataParallel (gradients of the logits are
then averaged across ranks).

Resuming: with `state_path`, the logits, AdamW's moments and the step count are written there
(safetensors, atomically) every `save_steps` steps; a later call with the same path and the same
batches continues from that step and ends where an uninterrupted run ends (the batch order is
the caller's and fixed; the schedule is recomputed from the step count).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sized

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from taxfree.errors import TaxfreeError


def save_ama_state(path: str | Path, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, step: int,
                   history: dict[str, list[float]]) -> None:
    """Logits, AdamW moments and step, as safetensors (no pickle); the loss history in the metadata."""
    import json

    from safetensors.torch import save as save_bytes

    from taxfree.atomic import atomic_write_bytes

    tensors = {}
    for i, p in enumerate(params):
        tensors[f"logit.{i}"] = p.detach().cpu().clone().reshape(1)
        for k, v in optimizer.state.get(p, {}).items():
            tensors[f"{k}.{i}"] = v.detach().cpu().clone().reshape(-1)
    meta = {"step": str(step), "history": json.dumps(history)}
    atomic_write_bytes(path, save_bytes(tensors, metadata=meta))


def load_ama_state(path: str | Path, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore what save_ama_state wrote; returns (step, history)."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if sum(1 for n in names if n.startswith("logit.")) != len(params):
                raise TaxfreeError(f"{path}: holds a different number of block logits than this model has")
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.copy_(f.get_tensor(f"logit.{i}").reshape(p.shape))
                    state = {}
                    for n in names:
                        key, _, idx = n.rpartition(".")
                        if idx == str(i) and key != "logit":
                            t = f.get_tensor(n)
                            state[key] = t.reshape(()) if key == "step" else t.reshape(p.shape).to(p.device)
                    if state:
                        optimizer.state[p] = state
            return int(meta.get("step", "0")), json.loads(meta.get("history", "{}"))
    except TaxfreeError:
        raise
    except Exception as e:
        raise TaxfreeError(f"{path}: cannot read the AMA training state: {str(e).splitlines()[0]}") from None


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
    state_path: str | Path | None = None,
    save_steps: int = 50,
    log_fn: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train the logits of an AdaptiveModelAverager (or a DDP wrapper of one) in place.

    `batches`: re-iterable batches of {"input_ids", "attention_mask"?, "labels"} (labels -100 on
    prompt and padding tokens); its len() sets the schedule unless `total_steps` is given.
    `log_fn(step, {"loss", "nll", "lr", "aligned_weight/<b>"...})` is called after every step.
    Returns {"steps", "losses" (total per step), "nll", "block_weights", "resumed_from"}.
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
    start, history = 0, {"losses": [], "nll": []}
    if state_path is not None and Path(state_path).is_file():
        start, history = load_ama_state(state_path, params, optimizer)
        with warnings.catch_warnings():  # stepping the schedule alone is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):  # the schedule is a function of the step count
                scheduler.step()
    device = params[0].device  # the caller's train/eval mode is kept: eval (no dropout) gives a noise-free objective
    losses, nlls, step = list(history.get("losses", [])), list(history.get("nll", [])), 0
    bar = tqdm(total=total_steps, initial=start, desc="ama", disable=not progress)
    for _ in range(epochs):
        for batch in batches:
            if step >= total_steps:
                break
            if step < start:  # done before the resume
                step += 1
                continue
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = averager(**batch)
            loss = out.loss + core.regularizer()
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            current_lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            nlls.append(out.loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if log_fn is not None:
                with torch.no_grad():
                    a = (1.0 - core.sft_weights()).tolist()
                log_fn(step, {"loss": losses[-1], "nll": nlls[-1], "lr": current_lr,
                              **{f"aligned_weight/{b}": w for b, w in enumerate(a)}})
            if state_path is not None and (step % save_steps == 0 or step == total_steps):
                save_ama_state(state_path, params, optimizer, step, {"losses": losses, "nll": nlls})
    bar.close()
    return {"steps": step, "losses": losses, "nll": nlls, "block_weights": core.block_weights(), "resumed_from": start}
