"""Checks of everything a user handed in (data files, model and tokenizer directories) before
any stage writes anything.

`load_config` checks types, keys and that paths exist; this goes one step further and opens them:
every record of a data file the planned stages read, each model directory's config and
safetensors headers, each tokenizer's special tokens and vocabulary against its model. A stage
may add checks of its own with a `preflight(cfg)` function (config combinations that need
knowledge of the stage). Inputs made by stages of the run are not checked here: they do not
exist yet, and the stage that made them wrote them in the right form.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from taxfree.errors import ConfigError, TaxfreeError

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
# Stage input names that are causal LM / classifier checkpoints (pairrm has its own loader).
MODEL_INPUTS = {"base", "sft", "backbone", "policy", "reward_model", "optimizer_ref", "optimizer_base", "ref"}
# Stages whose training ends sequences with eos (pretraining packs with it, TRL and our trainer
# append it to completions): a tokenizer without one cannot serve them.
EOS_STAGES = {"pretrain", "sft", "align", "rm", "ama"}


def _config_keys(cfg) -> dict[str, str]:
    """path -> the config key that named it (first one wins), for messages."""
    keys: dict[str, str] = {}

    def add(key: str, value):
        if isinstance(value, str) and value not in keys:
            keys[value] = key

    for f in dataclasses.fields(cfg.data):
        add(f"data.{f.name}", getattr(cfg.data, f.name))
    for k in ("tokenizer", "sft", "base"):
        add(f"models.{k}", getattr(cfg.models, k))
    add("rm.backbone", cfg.rm.backbone)
    add("sample.policy", cfg.sample.policy)
    add("evaluate.reward_model", cfg.evaluate.reward_model)
    for stage in ("pretrain", "sft", "align"):
        opt = getattr(cfg, stage).optimizer
        add(f"{stage}.optimizer.ref", opt.ref)
        add(f"{stage}.optimizer.base", opt.base)
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

    def stage(self, stage: str, module) -> None:
        from taxfree.models.load import check_model_dir, check_tokenizer, check_vocab, require_eos
        from taxfree.pipeline.config import looks_like_hub_id

        own = getattr(module, "preflight", None)
        if own is not None:
            own(self.cfg)
        given = {name: path for name, (upstream, path) in module.inputs(self.cfg).items()
                 if upstream is None and isinstance(path, str) and not looks_like_hub_id(path)}
        models = {}
        for name, path in sorted(given.items()):
            try:
                if path in self.data_kinds and Path(path).is_file():
                    if path not in self.formats:
                        self.formats[path] = self.data_format(path)
                elif name in MODEL_INPUTS and Path(path).is_dir():
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
            if stage in EOS_STAGES:
                require_eos(tokenizer, tok_path, f"the {stage} stage")
            for name, config in models.items():
                if name not in ("backbone", "reward_model"):  # classifiers may bring their own tokenizer
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
    from taxfree.pipeline.runner import stage_module

    checker = _Checker(cfg)
    for stage in stages:
        try:
            module = stage_module(stage)
        except ImportError:
            if skip_missing:
                continue
            raise
        checker.stage(stage, module)
