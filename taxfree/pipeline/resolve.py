"""Where each input of a stage comes from: the config when it names a path, else a stage of the run.

Every stage asks here, so "which model is the base / the SFT model / the tokenizer" has one answer.
"""

from __future__ import annotations

from pathlib import Path

from taxfree.data.tiny_world import world_files
from taxfree.errors import TaxfreeError
from taxfree.pipeline.paths import looks_like_hub_id

# data key -> attribute of TinyWorldFiles
_WORLD_DATA = {
    "pretrain_train": "corpus_train",
    "pretrain_eval": "corpus_eval",
    "sft_train": "sft_train",
    "sft_eval": "sft_eval",
    "pref_train": "pref_train",
    "pref_eval": "pref_eval",
    "eval_prompts": "eval_prompts",
}


def world_dir(cfg) -> Path:
    return cfg.stage_dir("world") / "data"


def data_source(cfg, key: str) -> tuple[str | None, str | None]:
    """(upstream stage or None, path or None) for a data key."""
    given = getattr(cfg.data, key)
    if given is not None:
        return None, given
    if cfg.world.kind == "tiny" and key in _WORLD_DATA:
        return "world", str(getattr(world_files(world_dir(cfg)), _WORLD_DATA[key]))
    return None, None


def data_path(cfg, key: str, required: bool = True) -> str | None:
    _, path = data_source(cfg, key)
    if path is None and required:
        raise TaxfreeError(f"{cfg.source}: data.{key}: required by this stage and not set")
    return path


def base_model_source(cfg) -> tuple[str | None, str]:
    if cfg.models.base is not None:
        return None, cfg.models.base
    return "pretrain", str(cfg.stage_dir("pretrain") / "model")


def sft_model_source(cfg) -> tuple[str | None, str]:
    if cfg.models.sft is not None:
        return None, cfg.models.sft
    return "sft", str(cfg.stage_dir("sft") / "model")


def tokenizer_source(cfg) -> tuple[str | None, str]:
    """The tokenizer every stage uses: explicit, else the world's, else the base/SFT model's own."""
    if cfg.models.tokenizer is not None:
        return None, cfg.models.tokenizer
    if cfg.world.kind == "tiny":
        return "world", str(world_files(world_dir(cfg)).tokenizer)
    if cfg.models.sft is not None:
        return None, cfg.models.sft
    return base_model_source(cfg)


def local_model_dir(ref: str) -> str:
    """A directory holding the checkpoint's files: `ref` itself, or a hub id's local snapshot.

    Streaming merges read safetensors files directly, so a hub id is resolved to its snapshot
    (downloaded when the hub is reachable, else from the cache).
    """
    if Path(ref).is_dir() or not looks_like_hub_id(ref):
        return ref
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
    except Exception as e:  # offline and not cached, unknown repo, ...
        raise TaxfreeError(f"{ref}: cannot get the checkpoint files: {str(e).splitlines()[0]}") from None
