"""What a path in a config names: a local file or model directory, or a hub id.

Config paths are relative to the directory the command runs in, with `~` expanded; a missing
file or model directory is a config error before anything runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from taxfree.errors import ConfigError


def looks_like_hub_id(ref: str) -> bool:
    """`org/name` that is not a local path: resolved by transformers from the hub or its cache."""
    if ref.startswith((".", "/", "~")) or os.sep + os.sep in ref:
        return False
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not Path(ref).exists()


def expand(value: str | None) -> str | None:
    return None if value is None else os.path.expanduser(value)


def require_file(source: str, key: str, value: str | None) -> None:
    if value is not None and not Path(value).is_file():
        raise ConfigError(f"{source}: {key}: file not found: {value}")


def is_model_ref(value: str | None) -> bool:
    """Unset, a hub id, or a model directory (one with config.json)."""
    return value is None or looks_like_hub_id(value) or (Path(value) / "config.json").is_file()
