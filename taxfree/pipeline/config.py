"""The experiment config: one YAML file, every stage in it, every value with a working default.

`load_config(path, overrides)` returns the experiment (taxfree.pipeline.experiment: the run-wide
sections plus each stage's own); any mistake is a `ConfigError` whose message is
`<file>: <key>: <why>`. Checks run in three steps, all before anything is written: types and
ranges of each section (its dataclass), the run-wide rules and the files the config names
(here), and each stage's rules across sections (`Stage.check`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import yaml

from taxfree.errors import ConfigError, TaxfreeError, nearest
from taxfree.pipeline.experiment import DataConfig, experiment_class
from taxfree.pipeline.paths import looks_like_hub_id, require_file
from taxfree.pipeline.schema import build_dataclass
from taxfree.pipeline.stages import STAGE_ORDER, all_stages

__all__ = ["load_config", "looks_like_hub_id", "ExperimentConfig"]


def __getattr__(name: str):
    if name == "ExperimentConfig":  # assembled from the stages' declarations on first use
        return experiment_class()
    raise AttributeError(name)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the
    last one silently, so `lr: 1e-5` further down a long section would win unseen)."""


def _construct_mapping(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML reports it below
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (lines {first + 1} and {key_node.start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path, source: str) -> dict:
    """The top-level mapping of a config file; a one-line ConfigError for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a UTF-8 text file") from None
    try:
        loader = _UniqueKeyLoader(text)  # a SafeLoader: builds plain data only
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: {where}: invalid YAML: {problem}") from None
    if data is None:
        raise ConfigError(f"{source}: the file is empty (or only comments): write the experiment's sections "
                          "(configs/experiments/demo.yaml is a complete example)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level: expected a mapping of sections")
    return data


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


def _check_run(cfg) -> None:
    """The run-wide rules: the name, the stage list, the files and models the config names."""
    src = cfg.source
    if not cfg.name or "/" in cfg.name or "\\" in cfg.name or cfg.name in (".", "..") or any(ord(c) < 32 for c in cfg.name):
        raise ConfigError(f"{src}: name: must be a plain directory name, got {cfg.name!r}")
    for s in cfg.stages or []:
        if s not in STAGE_ORDER:
            raise ConfigError(f"{src}: stages: unknown stage {s!r}{nearest(s, STAGE_ORDER)}")
    if cfg.seed_from not in STAGE_ORDER:
        raise ConfigError(f"{src}: seed_from: unknown stage {cfg.seed_from!r}{nearest(cfg.seed_from, STAGE_ORDER)}")
    if cfg.seeds is not None:
        if not cfg.seeds:
            raise ConfigError(f"{src}: seeds: list at least one seed (or null for one run with `seed`)")
        if len(set(cfg.seeds)) != len(cfg.seeds):
            raise ConfigError(f"{src}: seeds: a seed is listed twice")
        if any(s < 0 for s in cfg.seeds):
            raise ConfigError(f"{src}: seeds: seeds must be >= 0")
    for key in dataclasses.fields(DataConfig):
        require_file(src, f"data.{key.name}", getattr(cfg.data, key.name))
    for key in ("base", "sft", "tokenizer"):
        value = getattr(cfg.models, key)
        if value is None or looks_like_hub_id(value):
            continue
        p = Path(value)
        if not p.is_dir():
            raise ConfigError(f"{src}: models.{key}: model directory not found: {value}")
        if key != "tokenizer" and not (p / "config.json").is_file():
            raise ConfigError(f"{src}: models.{key}: {value} has no config.json (not a Hugging Face model directory)")
    from taxfree.models.chat_templates import resolve_chat_template

    try:
        resolve_chat_template(cfg.models.chat_template)
    except TaxfreeError as e:
        raise ConfigError(f"{src}: models.chat_template: {e}") from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None):
    """Parse and fully validate one experiment file; raises ConfigError, writes nothing."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{source}: file not found")
    data = copy.deepcopy(read_yaml(p, source))
    for assignment in overrides or []:
        _apply_override(data, assignment, source)
    cfg = build_dataclass(experiment_class(), data, "", source)
    cfg.source = source
    cfg.base_dir = str(p.resolve().parent)
    cfg.overrides = list(overrides or [])
    _check_run(cfg)
    for s in all_stages():
        if s.check is not None:
            s.check(cfg)
    return cfg
