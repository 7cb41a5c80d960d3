"""Checks of everything a user handed in (data files, model and tokenizer directories) before
any stage writes anything.

`load_config` checks types, keys and that paths exist; this goes one step further and opens them:
every record of a data file the planned stages read, each model directory's config and
safetensors headers, each tokenizer's special tokens and vocabulary against its model. What to
open comes from each stage's declaration (taxfree.pipeline.stages.Stage: `checkpoints`,
`needs_eos`); a stage may add checks of its own with `preflight` (config combinations that need
knowledge of the stage). Inputs made by stages of the run are not checked here: they do not
exist yet, and the stage that made them wrote them in the right form.
"""

from __future__ import annotations

import json
from pathlib import Path

from taxfree.errors import ConfigError, TaxfreeError
from taxfree.pipeline.paths import looks_like_hub_id
from taxfree.pipeline.stages import Stage, stage

# data.<key> -> record kind (taxfree.data.records)
DATA_KINDS = {
    "pretrain_train": "text",
    "pretrain_eval": "text",
    "sft_train": "sft",
    "sft_eval": "sft",
    "pref_train": "pref",
    "pref_eval": "pref",
    "eval_prompts": "prompt",
}


def _config_keys(cfg) -> dict[str, str]:
    """path -> the config key that named it (the data files first, then the models, then every
    stage section in order; the first key wins), for messages."""
    keys: dict[str, str] = {}

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        elif isinstance(value, str):
            keys.setdefault(value, prefix)

    tree = cfg.to_dict()
    for section in ("data", "models"):
        walk(section, tree.pop(section))
    walk("", tree)
    return keys


class _Checker:
    def __init__(self, cfg):
        self.cfg = cfg
        self.keys = _config_keys(cfg)
        self.data_kinds: dict[str, list[tuple[str, str]]] = {}  # path -> [(data key, kind)]: one file may serve two keys
        for k, kind in DATA_KINDS.items():
            if getattr(cfg.data, k):
                self.data_kinds.setdefault(getattr(cfg.data, k), []).append((f"data.{k}", kind))
        self.done: set[tuple] = set()
        self.tokenizers: dict = {}
        self.formats: dict[str, str] = {}  # data path -> standard | conversational

    def fail(self, path: str, stage: str, name: str, error: TaxfreeError) -> ConfigError:
        key = self.keys.get(path, f"{stage} input {name!r}")
        return ConfigError(f"{self.cfg.source}: {key}: {error}")

    def once(self, *key) -> bool:
        if key in self.done:
            return False
        self.done.add(key)
        return True

    def data_format(self, path: str) -> str:
        """Validate a data file as every kind the config uses it for; its format (standard or chat)."""
        from taxfree.data.records import read_jsonl, record_format

        fmt = None
        for key, kind in self.data_kinds[path]:
            try:
                records = read_jsonl(path, kind)
            except TaxfreeError as e:
                raise ConfigError(f"{self.cfg.source}: {key}: {e}") from None
            fmt = record_format(kind, records[0])
        return fmt

    def stage(self, declared: Stage) -> None:
        from taxfree.models.load import check_model_dir, check_tokenizer, check_vocab, require_eos

        stage = declared.name
        if declared.preflight is not None:
            declared.preflight(self.cfg)
        given = {name: path for name, (upstream, path) in declared.inputs(self.cfg).items()
                 if upstream is None and isinstance(path, str) and not looks_like_hub_id(path)}
        models = {}
        for name, path in sorted(given.items()):
            try:
                if path in self.data_kinds and Path(path).is_file():
                    if path not in self.formats:
                        self.formats[path] = self.data_format(path)
                elif name in declared.checkpoints and Path(path).is_dir():
                    models[name] = check_model_dir(path) if self.once("model", path) else _read_config(path)
            except ConfigError:
                raise
            except TaxfreeError as e:
                raise self.fail(path, stage, name, e) from None
        tok_path = given.get("tokenizer")
        if tok_path is None:
            return
        try:
            if tok_path not in self.tokenizers:
                self.tokenizers[tok_path] = check_tokenizer(tok_path, trust_remote_code=self.cfg.models.trust_remote_code)
            tokenizer = self.tokenizers[tok_path]
            if declared.needs_eos:
                require_eos(tokenizer, tok_path, f"the {stage} stage")
            for name, config in models.items():
                if declared.checkpoints[name] != "classifier":  # classifiers may bring their own tokenizer
                    check_vocab(tokenizer, tok_path, config, given[name])
            chat = [p for p in given.values() if self.formats.get(p) == "conversational"]
            if chat and not getattr(tokenizer, "chat_template", None):
                raise TaxfreeError(f"{tok_path}: tokenizer has no chat template, but {self.keys.get(chat[0], chat[0])} "
                                   "holds chat messages (use a tokenizer with one, or plain-string records)")
        except TaxfreeError as e:
            raise self.fail(tok_path, stage, "tokenizer", e) from None


def _read_config(path: str) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def check_stages(cfg, stages: list[str], skip_missing: bool = False) -> None:
    """Raise ConfigError (`<config>: <key>: <why>`) for the first bad input of `stages`.

    `skip_missing`: a stage whose module does not import is left out (`taxfree validate` says
    what it can; running that stage reports the problem)."""
    checker = _Checker(cfg)
    for name in stages:
        try:
            declared = stage(name)
        except ImportError:
            if skip_missing:
                continue
            raise
        checker.stage(declared)
