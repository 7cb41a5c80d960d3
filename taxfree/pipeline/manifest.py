"""Stage manifests (`stage.json`): what makes a stage directory a finished result.

A manifest is written last and atomically. Its `key` hashes everything the result depends on
(the stage's config section, the seed, the inputs' identities), so an unchanged stage is skipped
and a changed one re-runs. Its `run_id` changes every time the stage actually runs; downstream
keys include it, so re-running a stage re-runs everything after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path

from taxfree.atomic import atomic_write_json

MANIFEST = "stage.json"
STARTED = ".started.json"
_PACKAGES = ["taxfree", "torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "safetensors", "lm_eval", "deepspeed"]


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_obj(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def hash_file(path: str | os.PathLike, full_limit: int = 1 << 30) -> str:
    """Content hash; above `full_limit` bytes only size and mtime (hashing weights costs minutes)."""
    p = Path(path)
    st = p.stat()
    if st.st_size > full_limit:
        return hash_obj({"size": st.st_size, "mtime_ns": st.st_mtime_ns})
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_model_dir(path: str | os.PathLike) -> str:
    """Identity of a model directory: small files by content, weights by size and mtime."""
    p = Path(path)
    parts = {}
    for f in sorted(p.rglob("*")):
        if not f.is_file() or f.name.startswith(".tmp-"):
            continue
        rel = str(f.relative_to(p))
        if f.stat().st_size <= 8 << 20:
            parts[rel] = hash_file(f)
        else:
            st = f.stat()
            parts[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return hash_obj(parts)


def package_versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    return out


def read_manifest(stage_dir: str | os.PathLike) -> dict | None:
    p = Path(stage_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(stage_dir: str | os.PathLike, manifest: dict) -> None:
    atomic_write_json(Path(stage_dir) / MANIFEST, manifest)


def new_run_id() -> str:
    return uuid.uuid4().hex


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
