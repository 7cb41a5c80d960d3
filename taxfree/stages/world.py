"""`world`: writes the tiny world's data and tokenizer (DESIGN.md "Worlds and presets")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from taxfree.atomic import atomic_dir
from taxfree.data.tiny_world import build_tiny_world
from taxfree.errors import TaxfreeError
from taxfree.pipeline.resolve import world_dir
from taxfree.pipeline.schema import require
from taxfree.pipeline.stages import Stage


@dataclass
class TinyWorldConfig:
    """The offline tiny world (DESIGN.md "Worlds and presets"); see taxfree.data.tiny_world."""

    num_entities: int = 120
    corpus_repeats: int = 4
    max_operand: int = 20
    heldout_sum_fraction: float = 0.2
    sft_examples: int = 1500
    pref_pairs: int = 1500
    eval_prompts: int = 64
    eval_items: int = 200
    vocab_size: int = 512
    heldout_fraction: float = 0.05

    def check(self):
        require(self.num_entities >= 8, "num_entities", "must be >= 8")
        require(0.0 < self.heldout_fraction < 0.5, "heldout_fraction", "must be in (0, 0.5)")
        require(0.0 < self.heldout_sum_fraction < 0.9, "heldout_sum_fraction", "must be in (0, 0.9)")
        require(self.vocab_size >= 128, "vocab_size", "must be >= 128")


@dataclass
class WorldConfig:
    """Which world the run lives in: `tiny` (made offline by this stage) or `none` (the config's data)."""

    kind: Literal["tiny", "none"] = "tiny"
    tiny: TinyWorldConfig = field(default_factory=TinyWorldConfig)


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


STAGE = Stage(
    name="world",
    help="write the tiny world's data and tokenizer",
    config=WorldConfig,
    inputs=inputs,
    section=section,
    run=run,
    applies=lambda cfg: cfg.world.kind == "tiny",
)

