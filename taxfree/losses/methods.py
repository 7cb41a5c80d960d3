"""Every alignment method the align stage can train, each declared once next to its maths.

A module of `taxfree.losses` that defines `METHODS = (AlignMethod(...), ...)` adds methods: the
name, which trainer runs it (TRL's DPOTrainer or KTOTrainer under one of their loss names, or
our ContrastiveTrainer with the declared loss function), what data it trains on, and the
settings it reads (taxfree.params.Param). The align config section, its checks, the trainer
routing, the K checks and the help and docs tables all read these declarations, so a new loss
that TRL lacks is one module (its function and its declaration) and its test.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from taxfree.errors import TaxfreeError, nearest
from taxfree.params import Param, merge_params

TRL_DPO = "trl-dpo"
TRL_KTO = "trl-kto"
TAXFREE_CONTRASTIVE = "taxfree-contrastive"
TRAINERS = (TRL_DPO, TRL_KTO, TAXFREE_CONTRASTIVE)

PAIRS = "pairs"  # (prompt, chosen, rejected): data.pref_train, or pairs of the sample stage's samples
SAMPLES = "samples"  # K reward-scored completions per prompt: the sample stage's rw.jsonl

# A setting several methods share; declared here so each declaration reuses the same object.
BETA = Param("beta", 0.1, float, "strength of the KL regularisation (DPO, IPO, hinge, KTO, kto-pair, exo-pair)",
             within="> 0")


@dataclass(frozen=True)
class AlignMethod:
    """One alignment method.

    trainer: TRL_DPO / TRL_KTO (`loss_type` is the TRL trainer's name for it, `trainer_args` maps
    that trainer's config arguments to the align settings they come from) or TAXFREE_CONTRASTIVE
    (`loss(logratios[B, K], rewards[B, K], **settings)` returns the loss, or the loss and a dict
    of extra metrics, where settings are the declared `params`).
    data: PAIRS (K = 2, the winner is the completion with the larger reward) or SAMPLES (any K >= 2).
    reward_scale: the setting that turns log-ratios into the logged implicit rewards.
    """

    name: str
    help: str
    trainer: str
    data: str = PAIRS
    params: tuple[Param, ...] = ()
    loss_type: str | None = None
    trainer_args: dict[str, str] = field(default_factory=dict)
    loss: Callable[..., Any] | None = None
    reward_scale: str = "beta"
    paper: str = ""

    def __post_init__(self):
        if self.trainer not in TRAINERS:
            raise TypeError(f"method {self.name}: trainer must be one of {TRAINERS}")
        if self.data not in (PAIRS, SAMPLES):
            raise TypeError(f"method {self.name}: data must be {PAIRS!r} or {SAMPLES!r}")
        if (self.trainer == TAXFREE_CONTRASTIVE) != (self.loss is not None):
            raise TypeError(f"method {self.name}: a loss function exactly when the trainer is ours")
        if self.trainer != TAXFREE_CONTRASTIVE and self.loss_type is None:
            raise TypeError(f"method {self.name}: a TRL method names the trainer's loss_type")
        if self.trainer != TAXFREE_CONTRASTIVE and self.data != PAIRS:
            raise TypeError(f"method {self.name}: TRL's trainers take preference pairs")
        names = {p.name for p in self.params}
        if set(self.trainer_args.values()) - names:
            raise TypeError(f"method {self.name}: trainer_args must come from its params")
        if self.reward_scale not in names:
            raise TypeError(f"method {self.name}: reward_scale must be one of its params")

    @property
    def pairwise(self) -> bool:
        """Exactly two completions per prompt."""
        return self.data == PAIRS

    @property
    def needs_samples(self) -> bool:
        """Trains on the sample stage's reward-scored completions."""
        return self.data == SAMPLES

    def settings(self, source) -> dict:
        """The method's settings read from `source` (an align config section or trainer args)."""
        return {p.name: getattr(source, p.name) for p in self.params}


@functools.cache
def methods() -> dict[str, AlignMethod]:
    """name -> method, every `METHODS` declaration of the modules of taxfree.losses (found once
    per process; `methods.cache_clear()` looks again)."""
    import taxfree.losses as package

    found: dict[str, AlignMethod] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        for m in getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "METHODS", ()):
            if m.name in found:
                raise TypeError(f"two alignment methods are named {m.name!r}")
            found[m.name] = m
    merge_params([(m.name, m.params) for m in found.values()])  # one meaning per setting name
    return dict(sorted(found.items(), key=lambda kv: (TRAINERS.index(kv[1].trainer), kv[0])))


def method_names() -> tuple[str, ...]:
    return tuple(methods())


def align_method(name: str) -> AlignMethod:
    """The method called `name`, or a TaxfreeError naming the closest one."""
    known = methods()
    if name not in known:
        raise TaxfreeError(f"unknown alignment method {name!r}{nearest(name, known)}; expected one of {', '.join(known)}")
    return known[name]


def method_params() -> dict[str, Param]:
    """Every method's settings by name: the method keys an `align:` section takes."""
    return merge_params([(m.name, m.params) for m in methods().values()])


def methods_table() -> str:
    """The markdown table of methods (docs and `--help`)."""
    runner = {TRL_DPO: "TRL DPOTrainer", TRL_KTO: "TRL KTOTrainer", TAXFREE_CONTRASTIVE: "ContrastiveTrainer"}
    rows = ["| method | trains on | trainer | settings | what it is |", "|---|---|---|---|---|"]
    for m in methods().values():
        data = "K sampled completions (sample stage)" if m.needs_samples else "preference pairs"
        trainer = runner[m.trainer] + (f" (`{m.loss_type}`)" if m.loss_type else "")
        settings = ", ".join(f"`{p.name}`" for p in m.params)
        rows.append(f"| `{m.name}` | {data} | {trainer} | {settings} | {m.help} |")
    return "\n".join(rows)
