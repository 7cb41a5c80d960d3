"""The stage contract and the stage order: what the runner, preflight, the CLI, the Makefile and
evaluate's model discovery know about a stage, declared once by the stage itself.

A stage is a module `taxfree/stages/<name>.py` that ends with `STAGE = Stage(...)`; adding one
is that module plus its name in `STAGE_ORDER`. The modules are imported by name when first
asked for (`stage(name)`), so importing the pipeline imports no stage.

    inputs(cfg)  -> {name: (upstream stage | None, path)}  what it reads; a stage name makes the
                    result depend on that stage's run, a path on the file's content
    section(cfg) -> dict     the config that shapes its result (hashed into the stage key)
    run(ctx)     -> dict     does the work in ctx.dir; returns the metrics of its manifest
    preflight(cfg)           checks only this stage can make, before any stage runs (optional)
    check(cfg)               cross-section config checks at load time; raise ConfigError (optional)
    applies(cfg) -> bool     whether a run without `stages:` includes it (default: always)
    config                   the dataclass of its YAML section (`<name>:`), or None
    checkpoints              {input name: "causal_lm" | "classifier"}: the inputs preflight opens
                             as checkpoints when the config names them (a classifier may bring
                             its own tokenizer, so its vocabulary is not checked against the run's)
    needs_eos                it ends training sequences with eos: the tokenizer must have one
    makes_models             its finished variants hold models that `evaluate` measures
    keeps_variants           its directory holds variants with their own manifests, kept
                             across re-runs (the runner does not wipe the stage directory)
    across_seeds             with `seeds:` it runs once, after every seed, and reads every
                             seed's inputs (report); other stages from `seed_from` on run per seed
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from taxfree.errors import TaxfreeError, nearest

# The one list of stages, in the order a run executes them. The Makefile reads it (its stage
# targets), so keep it on one line.
STAGE_ORDER = ["world", "pretrain", "sft", "rm", "sample", "align", "merge", "ama", "evaluate", "report"]


def _always(cfg) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage's declaration (see the module docstring for each field)."""

    name: str
    help: str
    inputs: Callable[[Any], dict]
    section: Callable[[Any], dict]
    run: Callable[[Any], dict]
    config: type | None = None
    preflight: Callable[[Any], None] | None = None
    check: Callable[[Any], None] | None = None
    applies: Callable[[Any], bool] = _always
    checkpoints: dict[str, str] = field(default_factory=dict)
    needs_eos: bool = False
    makes_models: bool = False
    keeps_variants: bool = False
    across_seeds: bool = False


@dataclass
class StageContext:
    """What `Stage.run` gets: the config, its directory and key, and the identities of its inputs."""

    cfg: Any
    name: str
    dir: Path
    key: str
    run_id: str
    resumed: bool
    inputs: dict
    force: bool = False

    @property
    def tb_dir(self) -> Path:
        return self.dir / "tb"

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"


def stage(name: str) -> Stage:
    """The declaration of stage `name` (its module is imported on first use)."""
    if name not in STAGE_ORDER:
        raise TaxfreeError(f"unknown stage {name!r}{nearest(name, STAGE_ORDER)}")
    declared = getattr(importlib.import_module(f"taxfree.stages.{name}"), "STAGE", None)
    if not isinstance(declared, Stage) or declared.name != name:
        raise TypeError(f"taxfree/stages/{name}.py must end with STAGE = Stage(name={name!r}, ...)")
    return declared


def all_stages() -> list[Stage]:
    """Every stage, in run order."""
    return [stage(name) for name in STAGE_ORDER]


def model_stages() -> list[str]:
    """The stages whose variants are models that `evaluate` measures (align, merge, ama)."""
    return [s.name for s in all_stages() if s.makes_models]
