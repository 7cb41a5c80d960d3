"""One call for the pipeline stages: an optimizer by name, with tau built for the merging ones."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from taxfree.errors import TaxfreeError, nearest
from taxfree.optim.registry import all_hyperparameters, optimizer_spec


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    ref: Any = None,
    base: Any = None,
    seed: int = 0,
    defer_tau: bool = False,
    **hyperparameters: Any,
) -> torch.optim.Optimizer:
    """torch.optim.AdamW ("adamw") or an optimizer of the registry (taxfree.optim.registry) over
    the model's trainable parameters, with `hyperparameters` as its spec declares them (what is
    not given takes the class's own default). For the merging ones, ref (the SFT model the policy
    starts from) and base (the model SFT started from) are models, state dicts or safetensors
    checkpoint paths, and tau = ref - base is built here. A merging hyperparameter given to
    "adamw" is ignored (one settings section serves every optimizer of a run).
    defer_tau: build tau at the first step, in the layout the parameters then have (under
    DeepSpeed ZeRO: each rank only its partition's; see init_ref_param_diff)."""
    spec = optimizer_spec(name)
    known = all_hyperparameters()
    own = {p.name: p for p in spec.all_hyperparameters}
    for key, value in hyperparameters.items():
        if key not in known:
            raise TaxfreeError(f"{name}: unknown hyperparameter {key!r}{nearest(key, known)}")
        why = known[key].problem(value)
        if why is not None and key in own:
            raise TaxfreeError(f"{name}: {key} {why}")
    settings = {k: own[k].value(v) for k, v in hyperparameters.items() if k in own}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise TaxfreeError("the model has no trainable parameters (requires_grad)")
    if spec.cls is None:  # adamw
        return torch.optim.AdamW(named, lr=lr, **settings)
    if spec.merging:
        missing = [role for role, source in (("ref", ref), ("base", base)) if source is None]
        if missing:
            raise TaxfreeError(
                f"{name} needs the task vector's models: {' and '.join(missing)} not given "
                "(ref = the SFT model the policy starts from, base = the model SFT started from)"
            )
        optimizer = spec.cls(named, lr=lr, seed=seed, **settings)
        optimizer.init_ref_param_diff(ref, base, defer=defer_tau)
        return optimizer
    return spec.cls(named, lr=lr, **settings)
