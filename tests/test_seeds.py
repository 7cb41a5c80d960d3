"""Seeds as an axis of a run: the stages before `seed_from` run once and are shared, the later
ones run per seed in runs/<name>/seed<k>/, and adding a seed runs only that seed."""

import copy
import json

import pytest

from conftest import TINY_EXPERIMENT, write_config
from taxfree.errors import ConfigError
from taxfree.pipeline.config import load_config
from taxfree.pipeline.manifest import read_manifest
from taxfree.pipeline.runner import Runner

STAGES = ["world", "pretrain", "sft", "align"]


def experiment(tmp_path, **extra):
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp_path / "runs")
    data["align"] = {"methods": ["dpo"], "optimizers": ["adamw"], "max_steps": 3, "batch_size": 4, "lr": 1e-3,
                     "max_length": 48, "max_prompt_length": 24, "logging_steps": 1, "save_steps": 1000}
    data.update(extra)
    return write_config(tmp_path, data)


@pytest.mark.slow
def test_shared_stages_run_once_and_per_seed_stages_differ(tmp_path):
    path = experiment(tmp_path)
    root = tmp_path / "runs" / "t"
    Runner(load_config(path, ["seeds=[0, 1]"])).run(STAGES)
    shared = {s: read_manifest(root / s) for s in ("world", "pretrain", "sft")}
    assert all(m is not None for m in shared.values())
    per = {k: read_manifest(root / f"seed{k}" / "align" / "dpo-adamw") for k in (0, 1)}
    assert all(m is not None for m in per.values())
    assert not (root / "align").exists()  # per-seed stages live only under seed<k>/
    # Both seeds read the same shared SFT model (one run of it) ...
    for k in (0, 1):
        stage = read_manifest(root / f"seed{k}" / "align")
        assert stage["inputs"]["sft"]["run_id"] == shared["sft"]["run_id"] and stage["seed"] == k
    # ... and trained differently (their data order and initial state depend on the seed).
    assert per[0]["metrics"]["train_loss"] != per[1]["metrics"]["train_loss"]
    assert per[0]["key"] != per[1]["key"]

    # Adding a seed trains only that seed; the shared stages and the old seeds are up to date.
    Runner(load_config(path, ["seeds=[0, 1, 2]"])).run(STAGES)
    for s, m in shared.items():
        assert read_manifest(root / s)["run_id"] == m["run_id"], s
    for k in (0, 1):
        assert read_manifest(root / f"seed{k}" / "align" / "dpo-adamw")["run_id"] == per[k]["run_id"]
    assert read_manifest(root / "seed2" / "align" / "dpo-adamw") is not None

    # --force with one seed re-runs that seed's stage alone.
    Runner(load_config(path, ["seeds=[1]"]), force=True).run(["align"])
    assert read_manifest(root / "seed1" / "align" / "dpo-adamw")["run_id"] != per[1]["run_id"]
    assert read_manifest(root / "seed0" / "align" / "dpo-adamw")["run_id"] == per[0]["run_id"]
    assert read_manifest(root / "sft")["run_id"] == shared["sft"]["run_id"]


def test_seed_settings_are_checked(tmp_path):
    for override, message in (("seeds=[]", "seeds: list at least one seed"), ("seeds=[1, 1]", "a seed is listed twice"),
                              ("seed_from=algn", "seed_from: unknown stage 'algn' (did you mean align?)")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            load_config(experiment(tmp_path), [override])


def test_stage_directories_per_seed(tmp_path):
    cfg = load_config(experiment(tmp_path), ["seeds=[3, 4]", "seed_from=sft"])
    root = tmp_path / "runs" / "t"
    assert cfg.stage_dir("sft") == root / "sft"  # the shared config
    three = cfg.for_seed(3)
    assert three.seed == 3 and three.stage_dir("pretrain") == root / "pretrain"
    assert three.stage_dir("sft") == root / "seed3" / "sft" and three.stage_dir("evaluate") == root / "seed3" / "evaluate"
    assert three.stage_dir("report") == root / "report"  # gathers the seeds
    plain = load_config(experiment(tmp_path))
    assert plain.stage_dir("align") == root / "align" and not plain.per_seed("align")


@pytest.mark.slow
def test_seeds_in_processes_of_their_own_equal_one_process(tmp_path):
    """`--jobs 2`: each seed runs in its own `taxfree run --seeds K` process; the result is the
    sequential run's, bitwise (CPU), and each seed's log is kept."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    path_a, path_b = experiment(a), experiment(b)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "taxfree", "run", str(path_a), "--stages", ",".join(STAGES),
                        "--seeds", "0,1", "--jobs", "2"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "seed 0: running align in a process of its own" in r.stderr and "seed 1: done" in r.stderr
    Runner(load_config(path_b, ["seeds=[0, 1]"])).run(STAGES)
    for k in (0, 1):
        va, vb = (d / "runs" / "t" / f"seed{k}" / "align" / "dpo-adamw" for d in (a, b))
        wa, wb = load_file(va / "model" / "model.safetensors"), load_file(vb / "model" / "model.safetensors")
        assert all(torch.equal(wa[n], wb[n]) for n in wa)
        assert read_manifest(va)["metrics"]["train_loss"] == read_manifest(vb)["metrics"]["train_loss"]
        assert "align/dpo-adamw: done" in (a / "runs" / "t" / f"seed{k}" / "run.log").read_text()
