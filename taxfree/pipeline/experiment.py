"""The experiment: the run-wide sections (name, seed, models, data) plus one section per stage.

The run-wide part is declared here; each stage declares its own section's dataclass
(`Stage.config`), and `experiment_class()` puts them together in stage order, so a new stage's
settings need no edit here.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from taxfree.pipeline.paths import expand
from taxfree.pipeline.schema import to_dict
from taxfree.pipeline.stages import STAGE_ORDER, all_stages


@dataclass
class ModelsConfig:
    """Models the run starts from. null = made by a stage of this run (tiny world)."""

    base: str | None = None
    sft: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    # For tokenizers without one (base models, encoder reward backbones): `plain`, `chatml`, a
    # Jinja template or a .jinja file (taxfree.models.chat_templates). Tokenizers with their own keep it.
    chat_template: str | None = None

    def __post_init__(self):
        self.base, self.sft, self.tokenizer = expand(self.base), expand(self.sft), expand(self.tokenizer)


@dataclass
class DataConfig:
    """Data files (JSONL in the record formats of taxfree.data.records). null = from the world."""

    pretrain_train: str | None = None
    pretrain_eval: str | None = None
    sft_train: str | None = None
    sft_eval: str | None = None
    pref_train: str | None = None
    pref_eval: str | None = None
    eval_prompts: str | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, expand(getattr(self, f.name)))


@dataclass
class ExperimentBase:
    """The run-wide settings; `experiment_class()` adds a section per stage."""

    name: str = "experiment"
    seed: int = 0  # the seed of every stage, or with `seeds` of the shared stages
    # Seeds as an axis: the stages from `seed_from` on run once per seed (in runs/<name>/seed<k>/),
    # the ones before it once, with `seed`; null = one run with `seed`, no seed directories.
    seeds: list[int] | None = None
    seed_from: str = "align"
    run_dir: str = "runs"
    stages: list[str] | None = None
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)

    # Set by load_config and for_seed, not by the YAML.
    source: str = field(default="<config>", repr=False, init=False)
    base_dir: str = field(default=".", repr=False, init=False)
    seed_dir: str | None = field(default=None, repr=False, init=False)
    overrides: list[str] = field(default_factory=list, repr=False, init=False)  # the --set ones, in order

    @property
    def root(self) -> Path:
        """runs/<name>: every output of this experiment lives below it."""
        return Path(self.run_dir) / self.name

    def per_seed(self, stage: str) -> bool:
        """Whether `stage` runs once per seed (from `seed_from` on, except the stages that gather
        seeds); always False without `seeds`."""
        from taxfree.pipeline.stages import stage as declared

        if not self.seeds:
            return False
        return STAGE_ORDER.index(stage) >= STAGE_ORDER.index(self.seed_from) and not declared(stage).across_seeds

    def for_seed(self, seed: int):
        """This config for one seed: `seed` set, per-seed stages under runs/<name>/seed<k>/."""
        copy = dataclasses.replace(self)
        copy.source, copy.base_dir, copy.overrides = self.source, self.base_dir, list(self.overrides)
        copy.seed, copy.seed_dir = seed, str(self.root / f"seed{seed}")
        return copy

    def stage_dir(self, stage: str) -> Path:
        if self.seed_dir is not None and self.per_seed(stage):
            return Path(self.seed_dir) / stage
        return self.root / stage

    def enabled_stages(self) -> list[str]:
        """The stages a run without `--stages` executes: `stages:` if given, else each stage that
        applies to this config (the tiny world's stages only in the tiny world, ...)."""
        if self.stages is not None:
            return [s for s in STAGE_ORDER if s in self.stages]
        return [s.name for s in all_stages() if s.applies(self)]

    def to_dict(self) -> dict:
        d = to_dict(self)
        for key in ("source", "base_dir", "seed_dir", "overrides"):
            d.pop(key, None)
        return d


@functools.cache
def experiment_class() -> type:
    """ExperimentBase plus one field per stage that declares a config section, in stage order
    (made once per process; `experiment_class.cache_clear()` makes it again)."""
    sections = [(s.name, s.config, field(default_factory=s.config)) for s in all_stages() if s.config is not None]
    return dataclasses.make_dataclass("ExperimentConfig", sections, bases=(ExperimentBase,),
                                      namespace={"__module__": __name__})
