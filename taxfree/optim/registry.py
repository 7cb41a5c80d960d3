"""Every optimizer the pipeline can train with, each declared once by its own module.

A module of `taxfree.optim` that defines `OPTIMIZER = OptimizerSpec(...)` is an optimizer: its
name, class and hyperparameters (taxfree.params.Param: default, type, range, help) are what the
YAML `optimizer:` section accepts and checks, what `build_optimizer` passes on, and what the
help texts list. Adding an online merging optimizer is one module (its class and its spec) and
its test; nothing else lists optimizers.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

from taxfree.errors import TaxfreeError, nearest
from taxfree.params import Param, merge_params


def _betas_problem(betas) -> str | None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        return "each must be in [0, 1)"
    return None


# What every optimizer here is built on: torch.optim.AdamW's own settings (lr comes from the
# training section, as the schedule needs it).
ADAMW_HYPERPARAMETERS = (
    Param("weight_decay", 0.0, float, "decoupled weight decay, applied first as p *= 1 - lr*wd", within=">= 0"),
    Param("betas", (0.9, 0.999), tuple[float, float], "Adam's moment decay rates", check=_betas_problem),
    Param("eps", 1e-8, float, "added to Adam's denominator", within="> 0"),
)


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer the pipeline can build by name.

    `cls` takes `named_parameters` plus lr, the AdamW settings and `hyperparameters` as keyword
    arguments. `merging`: it steers updates with tau = ref - base, so it needs both models
    (`init_ref_param_diff`) and a `seed` for its masks.
    """

    name: str
    cls: Any
    help: str
    hyperparameters: tuple[Param, ...] = ()
    merging: bool = False

    @property
    def all_hyperparameters(self) -> tuple[Param, ...]:
        return ADAMW_HYPERPARAMETERS + self.hyperparameters


ADAMW = OptimizerSpec("adamw", None, "torch.optim.AdamW (the baseline; transformers' Trainer builds it)")

@functools.cache
def optimizers() -> dict[str, OptimizerSpec]:
    """name -> spec, adamw first, then the modules of taxfree.optim that declare one (by module
    name; found once per process, `optimizers.cache_clear()` looks again)."""
    import taxfree.optim as package

    found = {ADAMW.name: ADAMW}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        spec = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "OPTIMIZER", None)
        if spec is None:
            continue
        if spec.name in found:
            raise TypeError(f"two optimizers are named {spec.name!r}")
        found[spec.name] = spec
    merge_params([(s.name, s.all_hyperparameters) for s in found.values()])  # one meaning per name
    return found


def optimizer_names() -> tuple[str, ...]:
    return tuple(optimizers())


def optimizer_spec(name: str) -> OptimizerSpec:
    specs = optimizers()
    if name not in specs:
        raise TaxfreeError(f"unknown optimizer {name!r}{nearest(name, specs)}: choose one of {', '.join(specs)}")
    return specs[name]


def all_hyperparameters() -> dict[str, Param]:
    """The union of every optimizer's hyperparameters: the keys an `optimizer:` section takes."""
    return merge_params([(s.name, s.all_hyperparameters) for s in optimizers().values()])


def optimizers_table() -> str:
    """The markdown table of optimizers and their hyperparameters (docs and `--help`)."""
    rows = ["| optimizer | what it is | hyperparameters beyond AdamW's (default) |", "|---|---|---|"]
    for spec in optimizers().values():
        params = ", ".join(f"`{p.name}` ({p.default!r})" for p in spec.hyperparameters) or "none"
        rows.append(f"| `{spec.name}` | {spec.help} | {params} |")
    return "\n".join(rows)
