"""The experiment config: one YAML file, every stage in it, every value with a working default.

`load_config(path, overrides)` returns an `ExperimentConfig`; any mistake is a `ConfigError`
whose message is `<file>: <key>: <why>`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from taxfree.errors import ConfigError
from taxfree.pipeline.schema import build_dataclass, nearest, to_dict

STAGE_ORDER = ["world", "pretrain", "sft", "rm", "sample", "align", "merge", "ama", "evaluate", "report"]


class _Fail(ConfigError):
    """Raised by `check()` with a key relative to its section."""


def _require(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise _Fail(f"{key}: {why}")


@dataclass
class OptimizerConfig:
    """Which optimizer a training stage uses; names follow the online merging authors' code.

    Defaults are the authors' DPO settings (ALGORITHMS.md 1); with name adamw the merge
    fields are ignored.
    """

    name: Literal["adamw", "ondare", "onties"] = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    reserve_p: float = 0.01
    alpha: float = 1e-7
    use_merge: bool = True
    rescale: bool = False
    online_step: int = 1
    clip_tau: float = 1.0
    # Models defining tau = ref - base; null = taken from the run (ref = SFT output, base = the
    # model SFT started from).
    ref: str | None = None
    base: str | None = None

    def check(self):
        _require(0.0 < self.reserve_p <= 1.0, "reserve_p", f"{self.reserve_p} is outside (0, 1]")
        _require(0.0 <= self.alpha <= 1.0, "alpha", f"{self.alpha} is outside [0, 1]")
        _require(self.online_step >= 1, "online_step", "must be >= 1")
        _require(self.weight_decay >= 0.0, "weight_decay", "must be >= 0")
        _require(self.eps > 0.0, "eps", "must be > 0")
        _require(all(0.0 <= b < 1.0 for b in self.betas), "betas", "each must be in [0, 1)")
        _require(self.clip_tau > 0.0, "clip_tau", "must be > 0")


@dataclass
class TrainConfig:
    """What every training stage shares; one Trainer run."""

    epochs: float = 1.0
    max_steps: int = -1
    lr: float = 1e-5
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 8
    eval_batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 512
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    eval_steps: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    dataloader_workers: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def check(self):
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        _require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        _require(self.max_length >= 8, "max_length", "must be >= 8")
        _require(self.epochs > 0 or self.max_steps > 0, "epochs", "must be > 0 (or set max_steps)")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        _require(self.save_steps >= 1, "save_steps", "must be >= 1")
        _require(self.logging_steps >= 1, "logging_steps", "must be >= 1")


@dataclass
class TinyModelConfig:
    """Shape of the tiny Llama the tiny world pretrains (vocab size comes from its tokenizer)."""

    hidden_size: int = 64
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False

    def check(self):
        _require(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        _require(self.num_layers >= 1, "num_layers", "must be >= 1")


@dataclass
class PretrainConfig(TrainConfig):
    """Causal LM on the world's corpus (tiny world only): makes the `base` model."""

    epochs: float = 6.0
    lr: float = 3e-3
    warmup_ratio: float = 0.02
    batch_size: int = 32
    max_length: int = 64
    model: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class SFTStageConfig(TrainConfig):
    """Supervised fine-tuning with TRL's SFTTrainer, loss on responses only."""

    epochs: float = 2.0
    lr: float = 2e-5
    batch_size: int = 8
    max_length: int = 1024
    completion_only_loss: bool = True


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
        _require(self.num_entities >= 8, "num_entities", "must be >= 8")
        _require(0.0 < self.heldout_fraction < 0.5, "heldout_fraction", "must be in (0, 0.5)")
        _require(0.0 < self.heldout_sum_fraction < 0.9, "heldout_sum_fraction", "must be in (0, 0.9)")
        _require(self.vocab_size >= 128, "vocab_size", "must be >= 128")


@dataclass
class WorldConfig:
    kind: Literal["tiny", "none"] = "tiny"
    tiny: TinyWorldConfig = field(default_factory=TinyWorldConfig)


@dataclass
class ModelsConfig:
    """Models the run starts from. null = made by a stage of this run (tiny world)."""

    base: str | None = None
    sft: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False


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


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    run_dir: str = "runs"
    stages: list[str] | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)

    # Set by load_config, not by the YAML.
    source: str = field(default="<config>", repr=False)
    base_dir: str = field(default=".", repr=False)

    @property
    def root(self) -> Path:
        """runs/<name>: every output of this experiment lives below it."""
        return Path(self.run_dir) / self.name

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def enabled_stages(self) -> list[str]:
        if self.stages is not None:
            return list(self.stages)
        out = []
        for s in STAGE_ORDER:
            if s in ("world", "pretrain") and self.world.kind != "tiny":
                continue
            if s == "pretrain" and self.models.base is not None:
                continue
            if s == "sft" and self.models.sft is not None:
                continue
            if s not in IMPLEMENTED_STAGES:
                continue
            out.append(s)
        return out

    def section(self, stage: str) -> dict:
        obj = getattr(self, stage, None)
        if obj is None:
            return {}
        if stage == "world":
            return to_dict(self.world)
        return to_dict(obj)

    def to_dict(self) -> dict:
        d = to_dict(self)
        d.pop("source", None)
        d.pop("base_dir", None)
        return d


# Stages whose code exists; the CLI offers exactly these.
IMPLEMENTED_STAGES = ["world", "pretrain", "sft"]

_NOT_SECTIONS = {"source", "base_dir"}


def _apply_override(data: dict, assignment: str, source: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: {key}: --set goes through {p!r}, which is not a section")
        node = nxt
    node[parts[-1]] = value


def _resolve_path(cfg: ExperimentConfig, value: str | None) -> str | None:
    """Config paths are relative to the directory the command runs in, `~` expanded."""
    if value is None:
        return None
    return os.path.expanduser(value)


def looks_like_hub_id(ref: str) -> bool:
    """`org/name` that is not a local path: resolved by transformers from the hub or its cache."""
    if ref.startswith((".", "/", "~")) or os.sep + os.sep in ref:
        return False
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not Path(ref).exists()


def _check_paths(cfg: ExperimentConfig) -> None:
    src = cfg.source
    for key in dataclasses.fields(DataConfig):
        value = getattr(cfg.data, key.name)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{src}: data.{key.name}: file not found: {value}")
    for key in ("base", "sft", "tokenizer"):
        value = getattr(cfg.models, key)
        if value is None or looks_like_hub_id(value):
            continue
        p = Path(value)
        if not p.is_dir():
            raise ConfigError(f"{src}: models.{key}: model directory not found: {value}")
        if key != "tokenizer" and not (p / "config.json").is_file():
            raise ConfigError(f"{src}: models.{key}: {value} has no config.json (not a Hugging Face model directory)")
    for stage in ("pretrain", "sft"):
        opt = getattr(cfg, stage).optimizer
        for key in ("ref", "base"):
            value = getattr(opt, key)
            if value is not None and not looks_like_hub_id(value) and not (Path(value) / "config.json").is_file():
                raise ConfigError(f"{src}: {stage}.optimizer.{key}: model directory not found: {value}")


def _check_consistency(cfg: ExperimentConfig) -> None:
    src = cfg.source
    if cfg.stages is not None:
        for s in cfg.stages:
            if s not in STAGE_ORDER:
                raise ConfigError(f"{src}: stages: unknown stage {s!r}{nearest(s, STAGE_ORDER)}")
            if s not in IMPLEMENTED_STAGES:
                raise ConfigError(f"{src}: stages: stage {s!r} is not available in this version")
    if cfg.world.kind != "tiny":
        if cfg.models.base is None and cfg.models.sft is None:
            raise ConfigError(f"{src}: models.base: required when world.kind is not 'tiny' (nothing pretrains a base model)")
        if cfg.models.sft is None and cfg.data.sft_train is None:
            raise ConfigError(f"{src}: data.sft_train: required to run sft when world.kind is not 'tiny'")
    for stage in ("sft",):
        opt = getattr(cfg, stage).optimizer
        if opt.name != "adamw" and (opt.ref is None or opt.base is None):
            missing = "ref" if opt.ref is None else "base"
            raise ConfigError(
                f"{src}: {stage}.optimizer.{missing}: {opt.name} in {stage} needs optimizer.ref and optimizer.base "
                "(tau = ref - base); the run provides them only to the align stage"
            )
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"{src}: name: must be a plain directory name, got {cfg.name!r}")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> ExperimentConfig:
    """Parse and fully validate one experiment file; raises ConfigError, writes nothing."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{source}: file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: {where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a UTF-8 text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level: expected a mapping of sections")
    data = copy.deepcopy(data)
    for k in _NOT_SECTIONS:
        if k in data:
            raise ConfigError(f"{source}: {k}: unknown key")
    for assignment in overrides or []:
        _apply_override(data, assignment, source)
    cfg = build_dataclass(ExperimentConfig, data, "", source)
    cfg.source = source
    cfg.base_dir = str(p.resolve().parent)
    for key in dataclasses.fields(DataConfig):
        setattr(cfg.data, key.name, _resolve_path(cfg, getattr(cfg.data, key.name)))
    for key in ("base", "sft", "tokenizer"):
        setattr(cfg.models, key, _resolve_path(cfg, getattr(cfg.models, key)))
    _check_consistency(cfg)
    _check_paths(cfg)
    return cfg
