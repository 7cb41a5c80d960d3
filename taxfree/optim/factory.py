"""One call for the pipeline stages: an optimizer by name, with tau built for the merging ones."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from taxfree.errors import TaxfreeError
from taxfree.optim.ondare import OnDAREAdamW
from taxfree.optim.onties import OnTIESAdamW

OPTIMIZER_NAMES = ("adamw", "ondare", "onties")
_MERGING = {"ondare": OnDAREAdamW, "onties": OnTIESAdamW}


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    reserve_p: float = 1.0,
    alpha: float = 0.0,
    use_merge: bool = False,
    rescale: bool = False,
    online_step: int = 1,
    clip_tau: float = 1.0,
    ref: Any = None,
    base: Any = None,
    seed: int = 0,
    defer_tau: bool = False,
    **extra: Any,
) -> torch.optim.Optimizer:
    """torch.optim.AdamW ("adamw") or an online merging AdamW ("ondare", "onties") over the
    model's trainable parameters. For the merging ones, ref (the SFT model the policy starts
    from) and base (the model SFT started from) are models, state dicts or safetensors
    checkpoint paths, and tau = ref - base is built here. The merging arguments are ignored
    for "adamw". `extra` goes to the optimizer class (e.g. tau_dtype, weighted_election).
    defer_tau: build tau at the first step, in the layout the parameters then have (under
    DeepSpeed ZeRO: each rank only its partition's; see init_ref_param_diff)."""
    if name not in OPTIMIZER_NAMES:
        raise TaxfreeError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZER_NAMES)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise TaxfreeError("the model has no trainable parameters (requires_grad)")
    if name == "adamw":
        return torch.optim.AdamW(
            named, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra
        )
    if not 0.0 < reserve_p <= 1.0:
        raise TaxfreeError(f"{name}: reserve_p must be in (0, 1], got {reserve_p}")
    if not 0.0 <= alpha <= 1.0:
        raise TaxfreeError(f"{name}: alpha must be in [0, 1], got {alpha}")
    missing = [role for role, source in (("ref", ref), ("base", base)) if source is None]
    if missing:
        raise TaxfreeError(
            f"{name} needs the task vector's models: {' and '.join(missing)} not given "
            "(ref = the SFT model the policy starts from, base = the model SFT started from)"
        )
    optimizer = _MERGING[name](
        named,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        reserve_p=reserve_p,
        alpha=alpha,
        use_merge=use_merge,
        rescale=rescale,
        online_step=online_step,
        clip_tau=clip_tau,
        seed=seed,
        **extra,
    )
    optimizer.init_ref_param_diff(ref, base, defer=defer_tau)
    return optimizer
