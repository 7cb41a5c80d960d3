"""Runs stages in order, skipping finished ones whose inputs and config are unchanged.

A stage module provides:
  inputs(cfg) -> {name: (upstream_stage | None, path)}   what it reads
  section(cfg) -> dict                                   the config that shapes its result
  run(ctx) -> dict                                       does the work, returns metrics
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from taxfree.errors import DiskFullError, TaxfreeError, disk_full_error, is_disk_full
from taxfree.pipeline import manifest as mf
from taxfree.pipeline.config import IMPLEMENTED_STAGES, STAGE_ORDER, ExperimentConfig, looks_like_hub_id
from taxfree.pipeline.schema import nearest


class _Ranks:
    """The processes of a multi-process launch (accelerate, torchrun, mpirun): rank 0 writes
    results (directories, markers, manifests); every rank trains; the others wait for rank 0 at
    `barrier()` and take its decisions (`share`). One process: every call is a no-op."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.main = int(os.environ.get("RANK", "0")) == 0  # every launcher sets RANK (and WORLD_SIZE)
        self.state = None
        if self.world > 1:
            import torch
            from accelerate import PartialState

            cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)  # initializes the process group the Trainer then reuses

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, value):
        """Rank 0's value on every rank."""
        if self.state is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_RANKS: _Ranks | None = None


def ranks() -> _Ranks:
    global _RANKS
    if _RANKS is None:
        _RANKS = _Ranks()
    return _RANKS


def log(msg: str) -> None:
    print(f"[taxfree] {msg}", file=sys.stderr, flush=True)


@dataclass
class StageContext:
    cfg: ExperimentConfig
    name: str
    dir: Path
    key: str
    run_id: str
    resumed: bool
    inputs: dict
    force: bool = False

    @property
    def tb_dir(self) -> Path:
        return self.dir / "tb"

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"


def stage_module(name: str):
    if name not in IMPLEMENTED_STAGES:
        raise TaxfreeError(f"stage {name!r} is not available{nearest(name, IMPLEMENTED_STAGES)}")
    return importlib.import_module(f"taxfree.stages.{name}")


def _fingerprint(path: str) -> str:
    if looks_like_hub_id(path):
        return f"hub:{path}"
    p = Path(path)
    if p.is_dir():
        return mf.hash_model_dir(p)
    if p.is_file():
        return mf.hash_file(p)
    raise TaxfreeError(f"input not found: {path}")


class Runner:
    def __init__(self, cfg: ExperimentConfig, force: bool = False, argv: list[str] | None = None):
        self.cfg = cfg
        self.force = force
        self.argv = argv or sys.argv
        self._fresh: dict[str, str] = {}

    # -- planning ---------------------------------------------------------------------------
    def _upstream_run_id(self, stage: str, upstream: str, planned: list[str]) -> str:
        if upstream in planned and upstream in self._fresh:
            return self._fresh[upstream]
        m = mf.read_manifest(self.cfg.stage_dir(upstream))
        if m is None:
            raise TaxfreeError(
                f"{stage} needs the {upstream} stage, which has not finished: run `taxfree run {self.cfg.source} --stages {upstream}` first"
            )
        if m.get("key") != self.stage_key(upstream, planned):
            raise TaxfreeError(
                f"{stage} needs the {upstream} stage, whose result is out of date (config or inputs changed): "
                f"run `taxfree run {self.cfg.source} --stages {upstream}` first"
            )
        return m["run_id"]

    def stage_inputs(self, stage: str, planned: list[str]) -> dict:
        module = stage_module(stage)
        out = {}
        for name, (upstream, path) in sorted(module.inputs(self.cfg).items()):
            if upstream is not None:
                out[name] = {"stage": upstream, "run_id": self._upstream_run_id(stage, upstream, planned)}
            elif path is not None:
                out[name] = {"path": path, "hash": _fingerprint(path)}
        return out

    def stage_key(self, stage: str, planned: list[str]) -> str:
        module = stage_module(stage)
        return _key(self.cfg, {"stage": stage, "config": module.section(self.cfg),
                               "inputs": self.stage_inputs(stage, planned)})

    # -- running ----------------------------------------------------------------------------
    def run(self, stages: list[str] | None = None) -> dict[str, dict]:
        planned = list(stages) if stages is not None else self.cfg.enabled_stages()
        for s in planned:
            if s not in STAGE_ORDER:
                raise TaxfreeError(f"unknown stage {s!r}{nearest(s, STAGE_ORDER)}")
            stage_module(s)
        planned = [s for s in STAGE_ORDER if s in planned]
        from taxfree.pipeline.preflight import check_stages

        check_stages(self.cfg, planned)  # bad data or models: an error before anything is written
        self._fresh = {}
        results = {}
        created = _missing_parents(self.cfg.root)
        from taxfree.models.chat_templates import resolve_chat_template, run_chat_template

        try:
            with run_chat_template(resolve_chat_template(self.cfg.models.chat_template)):
                for stage in planned:
                    results[stage] = self.run_stage(stage, planned)
        except TaxfreeError:
            _remove_if_empty(created)  # a first run that failed leaves no empty runs/<name>/ behind
            raise
        return results

    def run_stage(self, stage: str, planned: list[str]) -> dict:
        module = stage_module(stage)
        cfg = self.cfg
        stage_dir = cfg.stage_dir(stage)
        inputs = self.stage_inputs(stage, planned)
        section = module.section(cfg)
        key = _key(cfg, {"stage": stage, "config": section, "inputs": inputs})
        old = mf.read_manifest(stage_dir)
        if old is not None and old.get("key") == key and not self.force:
            log(f"{stage}: up to date ({stage_dir})")
            self._fresh[stage] = old["run_id"]
            return old
        r = ranks()
        r.barrier()  # every rank has read the old manifest before rank 0 touches it
        if old is not None:
            why = "--force" if self.force else "config or inputs changed"
            log(f"{stage}: re-running ({why}); the previous result in {stage_dir} is replaced")
            if r.main:
                (stage_dir / mf.MANIFEST).unlink()
        started_path = stage_dir / mf.STARTED
        # Stages made of variants (align, merge) keep finished variants; each has its own manifest.
        resumed = _begin(stage_dir, key, self.force, wipe=not getattr(module, "KEEPS_VARIANTS", False)) if r.main else None
        resumed, run_id = r.share((resumed, mf.new_run_id()))
        ctx = StageContext(cfg=cfg, name=stage, dir=stage_dir, key=key, run_id=run_id, resumed=resumed,
                           inputs=inputs, force=self.force)
        log(f"{stage}: {'resuming' if resumed else 'running'} -> {stage_dir}")
        started_at, t0 = mf.now(), time.time()
        with _cleanup_on_user_error(stage_dir, resumed, wipe=not getattr(module, "KEEPS_VARIANTS", False)):
            metrics = module.run(ctx) or {}
        manifest = {
            "stage": stage,
            "key": key,
            "run_id": run_id,
            "config_hash": mf.hash_obj(section),
            "config": section,
            "inputs": inputs,
            "seed": cfg.seed,
            "experiment": cfg.to_dict(),
            "versions": mf.package_versions(),
            "command": list(self.argv),
            "cwd": os.getcwd(),
            "started_at": started_at,
            "finished_at": mf.now(),
            "duration_s": round(time.time() - t0, 3),
            "metrics": metrics,
        }
        r.barrier()  # every rank finished (and rank 0 saved) before the result is declared done
        if r.main:
            mf.write_manifest(stage_dir, manifest)
            started_path.unlink(missing_ok=True)
        r.barrier()
        self._fresh[stage] = run_id
        log(f"{stage}: done in {manifest['duration_s']:.1f}s; " + _summary(metrics))
        return manifest


def _key(cfg: ExperimentConfig, parts: dict) -> str:
    """The key of a stage or variant run: its parts, plus the run-wide settings that change what
    every stage computes (the chat template renders every conversation)."""
    if cfg.models.chat_template is not None:
        parts = {**parts, "chat_template": cfg.models.chat_template}
    return mf.hash_obj(parts)


def _begin(directory: Path, key: str, force: bool, wipe: bool) -> bool:
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
def _cleanup_on_user_error(directory: Path, resumed: bool, wipe: bool):
    """A stage (or variant) that stops on bad input or a full disk leaves no partial output.

    Bad input: a fresh start is removed, since everything in its directory was written by this
    attempt (`_begin` wiped the rest); a resumed one keeps its checkpoints. A full disk: half
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
                _remove_if_empty([directory])
        if isinstance(e, DiskFullError):  # an atomic writer already named the file
            raise DiskFullError(e.target, e.reason, kept or e.kept) from None
        if isinstance(e, TaxfreeError):
            raise
        raise disk_full_error(e, kept=kept) from None


def _complete_checkpoint(directory: Path) -> str | None:
    """The newest complete training checkpoint below a stage directory (incomplete ones are removed)."""
    from taxfree.stages.common import last_checkpoint

    found = last_checkpoint(directory)
    return str(Path(found).relative_to(directory.parent)) if found else None


def _missing_parents(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    out = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        out.append(p)
    return out


def _remove_if_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _summary(metrics: dict) -> str:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if isinstance(v, (int, float))]
    return ", ".join(items[:8])


def run_variants(ctx: StageContext, variants: dict[str, dict], fn, inputs_of=None) -> dict[str, dict]:
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
        key = _key(ctx.cfg, {"stage": ctx.name, "variant": name, "config": vconfig, "inputs": vinputs})
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
        resumed = r.share(_begin(vdir, key, ctx.force, wipe=True) if r.main else None)
        log(f"{ctx.name}/{name}: {'resuming' if resumed else 'running'} -> {vdir}")
        started_at, t0 = mf.now(), time.time()
        with _cleanup_on_user_error(vdir, resumed, wipe=True):
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
        log(f"{ctx.name}/{name}: done in {manifest['duration_s']:.1f}s; " + _summary(metrics))
        results[name] = manifest
    for child in sorted(ctx.dir.iterdir()) if ctx.dir.is_dir() else []:
        if child.is_dir() and child.name not in variants and (child / mf.MANIFEST).is_file() and ranks().main:
            log(f"{ctx.name}/{child.name}: no longer in the config, removed")
            shutil.rmtree(child)
    return results
