"""`world`: writes the tiny world's data and tokenizer (DESIGN.md "Worlds and presets")."""

from __future__ import annotations

import dataclasses

from taxfree.atomic import atomic_dir
from taxfree.data.tiny_world import build_tiny_world
from taxfree.errors import TaxfreeError
from taxfree.pipeline.resolve import world_dir


def inputs(cfg) -> dict:
    return {}


def section(cfg) -> dict:
    return {"world": dataclasses.asdict(cfg.world), "seed": cfg.seed}


def run(ctx) -> dict:
    cfg = ctx.cfg
    if cfg.world.kind != "tiny":
        raise TaxfreeError(f"{cfg.source}: world.kind: the world stage only builds the tiny world")
    with atomic_dir(world_dir(cfg), overwrite=True) as tmp:
        counts = build_tiny_world(tmp, seed=cfg.seed, **dataclasses.asdict(cfg.world.tiny))
    return counts
