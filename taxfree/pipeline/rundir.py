"""Stage and variant directories: how a result is started, resumed, cleaned up after bad input,
and declared finished.

A directory holds a result once its manifest (`stage.json`) is written, last and atomically. A
start marker (`.started.json`, holding the key) lets a killed run resume in place when the key is
unchanged; otherwise the old contents go. Variants (align's method x optimizer, merge points,
AMA models, ...) are directories of their own below a stage's, each with its own key and
manifest, so adding one runs only that one. Used by the runner and by the stages that have
variants; it imports neither.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from pathlib import Path

from taxfree.console import log
from taxfree.distributed import ranks
from taxfree.errors import DiskFullError, TaxfreeError, disk_full_error, is_disk_full
from taxfree.pipeline import manifest as mf


def run_key(cfg, parts: dict) -> str:
    """The key of a stage or variant run: its parts, plus the run-wide settings that change what
    every stage computes (the chat template renders every conversation)."""
    if cfg.models.chat_template is not None:
        parts = {**parts, "chat_template": cfg.models.chat_template}
    return mf.hash_obj(parts)


def begin(directory: Path, key: str, force: bool, wipe: bool) -> bool:
    """Prepare a stage (or variant) directory; True when an interrupted run with the same key
    is resumed in place, else the old contents are wiped (if `wipe`) and a new start recorded."""
    started_path = directory / mf.STARTED
    resumed = False
    if started_path.is_file() and not force:
        try:
            resumed = json.loads(started_path.read_text()).get("key") == key
        except (OSError, json.JSONDecodeError):
            resumed = False
    if not resumed and wipe and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not resumed:
        mf.atomic_write_json(started_path, {"key": key, "started_at": mf.now()})
    return resumed


@contextlib.contextmanager
def cleanup_on_user_error(directory: Path, resumed: bool, wipe: bool):
    """A stage (or variant) that stops on bad input or a full disk leaves no partial output.

    Bad input: a fresh start is removed, since everything in its directory was written by this
    attempt (`begin` wiped the rest); a resumed one keeps its checkpoints. A full disk: half
    written checkpoints go, complete ones (and the start marker) stay so that the re-run resumes
    instead of losing hours of training; with nothing complete it is handled like bad input.
    Any other exception (a kill, a bug) leaves everything in place: that is what resuming is for.
    Stages that keep finished variants lose only their start marker (and an emptied directory).
    """
    try:
        yield
    except Exception as e:
        disk_full = isinstance(e, DiskFullError) or is_disk_full(e)
        if not isinstance(e, TaxfreeError) and not disk_full:
            raise
        kept = _complete_checkpoint(directory) if disk_full else None
        if not resumed and kept is None:
            if wipe:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                (directory / mf.STARTED).unlink(missing_ok=True)
                remove_if_empty([directory])
        if isinstance(e, DiskFullError):  # an atomic writer already named the file
            raise DiskFullError(e.target, e.reason, kept or e.kept) from None
        if isinstance(e, TaxfreeError):
            raise
        raise disk_full_error(e, kept=kept) from None


def _complete_checkpoint(directory: Path) -> str | None:
    """The newest complete training checkpoint below a stage directory (incomplete ones are removed)."""
    found = last_checkpoint(directory)
    return str(Path(found).relative_to(directory.parent)) if found else None


def last_checkpoint(stage_dir: Path) -> str | None:
    """The newest complete checkpoint to resume from, or None.

    The Trainer writes `checkpoint-N/` in place and `trainer_state.json` last, so a process
    killed while saving leaves a directory without it; resuming from that fails (or worse,
    loads half a state). Such directories are removed and the previous complete one is used.
    """
    ckpt = Path(stage_dir) / "checkpoints"
    if not ckpt.is_dir():
        return None
    complete = []
    for d in ckpt.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if not m or not d.is_dir():
            continue
        if _readable_json(d / "trainer_state.json"):
            complete.append((int(m.group(1)), d))
        else:
            shutil.rmtree(d, ignore_errors=True)
    return str(max(complete)[1]) if complete else None


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def missing_parents(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    out = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        out.append(p)
    return out


def remove_if_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def summary(metrics: dict) -> str:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if isinstance(v, (int, float))]
    return ", ".join(items[:8])


def run_variants(ctx, variants: dict[str, dict], fn, inputs_of=None) -> dict[str, dict]:
    """Run each variant of a stage in `ctx.dir/<variant>/`, with its own manifest and key.

    `fn(name, vdir, resumed) -> metrics`. A finished variant with the same key is skipped, so
    adding a method to a config trains only that method. Variant directories that are no longer
    configured are removed (said in the log). `inputs_of(name)` names the stage inputs a variant
    reads (default: all), so a variant is not re-run for an input only its siblings use.
    """
    results = {}
    for name, vconfig in variants.items():
        vdir = ctx.dir / name
        vinputs = ctx.inputs if inputs_of is None else {k: ctx.inputs[k] for k in inputs_of(name) if k in ctx.inputs}
        key = run_key(ctx.cfg, {"stage": ctx.name, "variant": name, "config": vconfig, "inputs": vinputs})
        old = mf.read_manifest(vdir)
        if old is not None and old.get("key") == key and not ctx.force:
            log(f"{ctx.name}/{name}: up to date")
            results[name] = old
            continue
        r = ranks()
        r.barrier()
        if old is not None:
            log(f"{ctx.name}/{name}: re-running ({'--force' if ctx.force else 'config or inputs changed'})")
            if r.main:
                (vdir / mf.MANIFEST).unlink()
        started_path = vdir / mf.STARTED
        resumed = r.share(begin(vdir, key, ctx.force, wipe=True) if r.main else None)
        log(f"{ctx.name}/{name}: {'resuming' if resumed else 'running'} -> {vdir}")
        started_at, t0 = mf.now(), time.time()
        with cleanup_on_user_error(vdir, resumed, wipe=True):
            metrics = fn(name, vdir, resumed) or {}
        manifest = {
            "stage": ctx.name,
            "variant": name,
            "key": key,
            "run_id": r.share(mf.new_run_id()),
            "config_hash": mf.hash_obj(vconfig),
            "config": vconfig,
            "inputs": vinputs,
            "seed": ctx.cfg.seed,
            "versions": mf.package_versions(),
            "started_at": started_at,
            "finished_at": mf.now(),
            "duration_s": round(time.time() - t0, 3),
            "metrics": metrics,
        }
        r.barrier()
        if r.main:
            mf.write_manifest(vdir, manifest)
            started_path.unlink(missing_ok=True)
        r.barrier()
        log(f"{ctx.name}/{name}: done in {manifest['duration_s']:.1f}s; " + summary(metrics))
        results[name] = manifest
    for child in sorted(ctx.dir.iterdir()) if ctx.dir.is_dir() else []:
        if child.is_dir() and child.name not in variants and (child / mf.MANIFEST).is_file() and ranks().main:
            log(f"{ctx.name}/{child.name}: no longer in the config, removed")
            shutil.rmtree(child)
    return results
