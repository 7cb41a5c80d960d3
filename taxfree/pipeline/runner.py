"""Runs stages in order, skipping finished ones whose inputs and config are unchanged.

Each stage is declared by its module (`taxfree.pipeline.stages.Stage`); the runner plans from
those declarations, keys each stage by its config section and its inputs' identities, and
writes the manifest that makes a stage directory a result (`taxfree.pipeline.rundir`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from taxfree.console import log
from taxfree.distributed import ranks
from taxfree.errors import TaxfreeError
from taxfree.pipeline import manifest as mf
from taxfree.pipeline.paths import looks_like_hub_id
from taxfree.pipeline.preflight import check_stages
from taxfree.pipeline.rundir import begin, cleanup_on_user_error, missing_parents, remove_if_empty, run_key, summary
from taxfree.pipeline.stages import STAGE_ORDER, StageContext, stage


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
    """Runs a config's stages. With `seeds:` the stages before `seed_from` run once (the shared
    ones), every later stage once per seed in `<run>/seed<k>/`, and the stages that gather
    seeds (`Stage.across_seeds`: report) once after all of them."""

    def __init__(self, cfg, force: bool = False, argv: list[str] | None = None, jobs: int = 1):
        self.cfg = cfg
        self.force = force
        self.argv = argv or sys.argv
        self.jobs = jobs  # seeds run side by side, each in a process of its own (`--jobs`)
        self._fresh: dict[str, str] = {}  # stage directory -> run id of what ran in this call

    def _cfg_for(self, cfg, name: str):
        """The config a stage runs with: the seed's for per-seed stages, else the shared one."""
        return cfg if cfg.per_seed(name) else self.cfg

    # -- planning ---------------------------------------------------------------------------
    def _upstream_run_id(self, cfg, reader: str, upstream: str, planned: list[str]) -> str:
        cfg = self._cfg_for(cfg, upstream)
        where = str(cfg.stage_dir(upstream))
        if upstream in planned and where in self._fresh:
            return self._fresh[where]
        m = mf.read_manifest(cfg.stage_dir(upstream))
        if m is None:
            raise TaxfreeError(
                f"{reader} needs the {upstream} stage, which has not finished: run `taxfree run {cfg.source} --stages {upstream}` first"
            )
        if m.get("key") != self.stage_key(upstream, planned, cfg):
            raise TaxfreeError(
                f"{reader} needs the {upstream} stage, whose result is out of date (config or inputs changed): "
                f"run `taxfree run {cfg.source} --stages {upstream}` first"
            )
        return m["run_id"]

    def stage_inputs(self, name: str, planned: list[str], cfg=None) -> dict:
        """What a stage reads, with identities: an upstream stage's run id, a file's hash. A stage
        that gathers seeds reads its inputs once per seed (`seed<k>/<input>`)."""
        cfg = cfg or self.cfg
        declared = stage(name)
        if declared.across_seeds and cfg.seeds:
            out = {}
            for k in cfg.seeds:
                for key, value in self.stage_inputs(name, planned, cfg.for_seed(k)).items():
                    out[f"seed{k}/{key}"] = value
            return out
        out = {}
        for key, (upstream, path) in sorted(declared.inputs(cfg).items()):
            if upstream is not None:
                out[key] = {"stage": upstream, "run_id": self._upstream_run_id(cfg, name, upstream, planned)}
            elif path is not None:
                out[key] = {"path": path, "hash": _fingerprint(path)}
        return out

    def stage_key(self, name: str, planned: list[str], cfg=None) -> str:
        cfg = cfg or self.cfg
        return run_key(cfg, {"stage": name, "config": stage(name).section(cfg),
                             "inputs": self.stage_inputs(name, planned, cfg)})

    # -- running ----------------------------------------------------------------------------
    def run(self, stages: list[str] | None = None) -> dict[str, dict]:
        """Results by stage; with seeds, per-seed stages as `seed<k>/<stage>`."""
        planned = list(stages) if stages is not None else self.cfg.enabled_stages()
        for s in planned:
            stage(s)  # an unknown name is an error before anything runs
        planned = [s for s in STAGE_ORDER if s in planned]
        check_stages(self.cfg, planned)  # bad data or models: an error before anything is written
        self._fresh = {}
        results = {}
        created = missing_parents(self.cfg.root)
        from taxfree.models.chat_templates import resolve_chat_template, run_chat_template

        seeds = self.cfg.seeds
        try:
            with run_chat_template(resolve_chat_template(self.cfg.models.chat_template)):
                if not seeds:
                    for name in planned:
                        results[name] = self.run_stage(name, planned)
                else:
                    gather = [s for s in planned if stage(s).across_seeds]
                    for name in planned:
                        if not self.cfg.per_seed(name) and name not in gather:
                            results[name] = self.run_stage(name, planned)
                    per_seed = [s for s in planned if self.cfg.per_seed(s)]
                    if self.jobs > 1 and len(seeds) > 1 and per_seed:
                        results.update(self._run_seed_processes(per_seed))
                    else:
                        for k in seeds:
                            cfg = self.cfg.for_seed(k)
                            log(f"seed {k}: {cfg.seed_dir}")
                            for name in per_seed:
                                results[f"seed{k}/{name}"] = self.run_stage(name, planned, cfg)
                    for name in gather:
                        results[name] = self.run_stage(name, planned)
        except TaxfreeError:
            remove_if_empty(created)  # a first run that failed leaves no empty runs/<name>/ behind
            raise
        return results

    def _run_seed_processes(self, stages: list[str]) -> dict[str, dict]:
        """Each seed's stages in a `taxfree run --seeds K` process of its own, `self.jobs` at a
        time (the shared stages have finished, so every process finds them up to date); each
        process's log goes to `seed<k>/run.log`. A seed that fails is one error naming its log."""
        import subprocess

        if ranks().world > 1:
            raise TaxfreeError("--jobs runs seeds in processes of their own; under a multi-process launch "
                               "(accelerate, torchrun, mpirun) leave it at 1")
        cfg = self.cfg
        base = [sys.executable, "-m", "taxfree", "run", cfg.source, "--stages", ",".join(stages)]
        base += [a for o in cfg.overrides for a in ("--set", o)] + (["--force"] if self.force else [])
        pending, running, results = list(cfg.seeds), [], {}
        while pending or running:
            while pending and len(running) < self.jobs:
                k = pending.pop(0)
                log_path = cfg.for_seed(k).stage_dir(stages[0]).parent / "run.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                handle = open(log_path, "wb")
                log(f"seed {k}: running {', '.join(stages)} in a process of its own (log: {log_path})")
                running.append((k, subprocess.Popen([*base, "--seeds", str(k)], stdout=handle, stderr=handle), handle, log_path))
            for item in list(running):
                k, proc, handle, log_path = item
                if proc.poll() is None:
                    continue
                handle.close()
                running.remove(item)
                if proc.returncode != 0:
                    for _, other, h, _ in running:
                        other.kill()
                        other.wait()
                        h.close()
                    tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith("error:")]
                    raise TaxfreeError(f"seed {k} failed (exit {proc.returncode}): "
                                       f"{tail[-1].removeprefix('error: ') if tail else 'see ' + str(log_path)}")
                log(f"seed {k}: done")
                for name in stages:
                    results[f"seed{k}/{name}"] = mf.read_manifest(cfg.for_seed(k).stage_dir(name))
            time.sleep(0.2)
        return results

    def run_stage(self, name: str, planned: list[str], cfg=None) -> dict:
        declared = stage(name)
        cfg = cfg or self.cfg
        stage_dir = cfg.stage_dir(name)
        inputs = self.stage_inputs(name, planned, cfg)
        section = declared.section(cfg)
        key = run_key(cfg, {"stage": name, "config": section, "inputs": inputs})
        old = mf.read_manifest(stage_dir)
        if old is not None and old.get("key") == key and not self.force:
            log(f"{name}: up to date ({stage_dir})")
            self._fresh[str(stage_dir)] = old["run_id"]
            return old
        r = ranks()
        r.barrier()  # every rank has read the old manifest before rank 0 touches it
        if old is not None:
            why = "--force" if self.force else "config or inputs changed"
            log(f"{name}: re-running ({why}); the previous result in {stage_dir} is replaced")
            if r.main:
                (stage_dir / mf.MANIFEST).unlink()
        started_path = stage_dir / mf.STARTED
        # Stages made of variants (align, merge) keep finished variants; each has its own manifest.
        wipe = not declared.keeps_variants
        resumed = begin(stage_dir, key, self.force, wipe=wipe) if r.main else None
        resumed, run_id = r.share((resumed, mf.new_run_id()))
        ctx = StageContext(cfg=cfg, name=name, dir=stage_dir, key=key, run_id=run_id, resumed=resumed,
                           inputs=inputs, force=self.force)
        log(f"{name}: {'resuming' if resumed else 'running'} -> {stage_dir}")
        started_at, t0 = mf.now(), time.time()
        with cleanup_on_user_error(stage_dir, resumed, wipe=wipe):
            metrics = declared.run(ctx) or {}
        manifest = {
            "stage": name,
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
        self._fresh[str(stage_dir)] = run_id
        log(f"{name}: done in {manifest['duration_s']:.1f}s; " + summary(metrics))
        return manifest
