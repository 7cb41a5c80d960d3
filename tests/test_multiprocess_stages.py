"""sft and align under `accelerate launch` with 2 CPU processes (gloo), on the tiny world.

world and pretrain run first in this process; then each stage runs as
`accelerate launch --num_processes 2 ... -m taxfree <stage> CONFIG`, through
tests/helpers_launch_probe.py: that is `python -m taxfree` plus a log of every atomic write with
the rank that made it, and it drops the writes of rank 1 after logging them. So the run directory
holds rank 0's results only and the training checks below are deterministic, while the log tells
whether rank 1 tried to write at all (it must not: only rank 0 writes results).

Two CPU processes: `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate
1.15 (its multi-CPU launcher is mpirun with an MPI hostfile; without one, `--cpu` runs a single
process, and the run would silently train with world size 1). So the launch here is torchrun's
(`--multi_gpu`) with ACCELERATE_USE_CPU=true, which makes every process a CPU rank on gloo; the
assertions below check that two processes really trained.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_EXPERIMENT, write_config

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ACCELERATE = Path(sys.executable).parent / "accelerate"
PROBE = REPO / "tests" / "helpers_launch_probe.py"
WORLD = 2
SFT_BATCH = 8
ALIGN_BATCH = 4


def _experiment(tmp: Path) -> dict:
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp / "runs")
    data["pretrain"]["epochs"] = 2
    data["sft"].update(epochs=1, batch_size=SFT_BATCH, save_steps=1000)
    data["align"] = {
        "methods": ["dpo"], "optimizers": ["adamw", "ondare"], "epochs": 1, "lr": 1.0e-3,
        "batch_size": ALIGN_BATCH, "max_length": 48, "max_prompt_length": 24, "logging_steps": 4,
        "save_steps": 1000, "optimizer": {"reserve_p": 0.3, "alpha": 0.05},
    }
    return data


def _launch(stage: str, config: Path, log: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", TAXFREE_PROBE_LOG=str(log),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(PROBE), stage, str(config)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _writes(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.is_file() else []


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Run world + pretrain here, then sft and align under 2 processes; return what they left."""
    from taxfree.cli import main

    if not ACCELERATE.is_file():
        pytest.skip("accelerate launcher not installed")
    tmp = tmp_path_factory.mktemp("mp")
    config = write_config(tmp, _experiment(tmp))
    assert main(["run", str(config), "--stages", "world,pretrain"]) == 0
    root = tmp / "runs" / "t"
    logs = {}
    for stage in ("sft", "align"):
        logs[stage] = tmp / f"{stage}.writes.jsonl"
        _launch(stage, config, logs[stage], tmp)
    return {"root": root, "config": config, "writes": {s: _writes(p) for s, p in logs.items()}}


def _manifest(path: Path) -> dict:
    return json.loads((path / "stage.json").read_text(encoding="utf-8"))


def _last_checkpoint(stage_dir: Path) -> Path:
    ckpts = sorted((stage_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts, f"no checkpoint under {stage_dir}"
    return ckpts[-1]


def _assert_trained_with_two_processes(stage_dir: Path, examples: int, per_device: int) -> dict:
    m = _manifest(stage_dir)["metrics"]
    assert m["train_examples"] == examples
    # One optimizer step per global batch of WORLD x per-device examples (one process: twice as many).
    assert m["steps"] == math.ceil(examples / (per_device * WORLD))
    assert m["steps"] != math.ceil(examples / per_device)
    ckpt = _last_checkpoint(stage_dir)
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == m["steps"] and state["train_batch_size"] == per_device
    # The Trainer keeps one RNG state per process: world size 2.
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    return m


def _assert_loadable(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_sft_two_processes_train_on_the_global_batch(two_process_run):
    root = two_process_run["root"]
    world_sft = sum(1 for _ in open(root / "world" / "data" / "sft_train.jsonl", encoding="utf-8"))
    m = _assert_trained_with_two_processes(root / "sft", world_sft, SFT_BATCH)
    assert m["eval_loss"] < m["eval_loss_before"]
    _assert_loadable(root / "sft" / "model")


@pytest.mark.parametrize("variant", ["dpo-adamw", "dpo-ondare"])
def test_align_two_processes_train_on_the_global_batch(two_process_run, variant):
    root = two_process_run["root"]
    pairs = sum(1 for _ in open(root / "world" / "data" / "pref_train.jsonl", encoding="utf-8"))
    vdir = root / "align" / variant
    m = _assert_trained_with_two_processes(vdir, pairs, ALIGN_BATCH)
    assert m["optimizer"] == variant.split("-")[1] and math.isfinite(m["train_loss"])
    assert (root / "align" / "stage.json").is_file()
    _assert_loadable(vdir / "model")
    # The align model differs from the SFT model it started from (training happened).
    from safetensors.torch import load_file

    before, after = load_file(root / "sft" / "model" / "model.safetensors"), load_file(vdir / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not before[k].equal(after[k]) for k in before)


def test_the_probe_ran_in_the_two_process_job(two_process_run):
    """The write log is trustworthy: it recorded the stage's manifests from inside the 2-rank job."""
    for stage, writes in two_process_run["writes"].items():
        manifests = [w for w in writes if w["op"] == "file" and w["path"].endswith("/stage.json")]
        assert manifests, f"{stage}: no stage.json write recorded"
        assert all(w["world"] == WORLD for w in manifests), manifests


def test_only_the_main_process_writes_manifests_and_models(two_process_run):
    root = two_process_run["root"]
    for stage, writes in two_process_run["writes"].items():
        by_rank = {w["rank"] for w in writes}
        assert by_rank == {0}, f"{stage}: ranks {sorted(by_rank)} wrote results: {writes}"
        manifests = [w["path"] for w in writes if w["op"] == "file" and w["path"].endswith("/stage.json")]
        assert len(manifests) == len(set(manifests)), f"{stage}: a stage.json was written twice: {manifests}"
        models = [w["path"] for w in writes if w["op"] == "dir" and w["path"].endswith("/model")]
        assert len(models) == len(set(models)), f"{stage}: a model was written twice: {models}"
    for stage_dir in (root / "sft", root / "align" / "dpo-adamw", root / "align" / "dpo-ondare"):
        events = list((stage_dir / "tb").glob("events.out.tfevents.*"))
        assert len(events) == 1, f"{stage_dir}: one tensorboard log per run, got {len(events)}"


def _mpi_launcher() -> str | None:
    venv = Path(sys.executable).parent / "mpiexec"
    return str(venv) if venv.is_file() else shutil.which("mpiexec")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(_mpi_launcher() is None, reason="no MPI launcher (mpiexec)")
def test_sft_under_mpirun_finds_its_ranks_through_mpi4py(two_process_run, tmp_path):
    """`mpirun -n 2 python -m taxfree sft CONFIG` (what scripts/launch_mpi.sh runs): no launcher sets
    RANK / WORLD_SIZE / MASTER_ADDR; each rank learns them from MPI (taxfree.distributed)."""
    pytest.importorskip("mpi4py")
    data = _experiment(tmp_path)
    config = write_config(tmp_path, data)
    root = tmp_path / "runs" / "t"
    root.mkdir(parents=True)
    for stage in ("world", "pretrain"):  # the same finished upstream stages, in a run of its own
        shutil.copytree(two_process_run["root"] / stage, root / stage)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost:2\n", encoding="utf-8")  # MPICH's format; Open MPI: "localhost slots=2"
    log = tmp_path / "sft.writes.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", TAXFREE_PROBE_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]))
    flavour = subprocess.run([_mpi_launcher(), "--version"], capture_output=True, text=True).stdout
    hosts = ["--hostfile", str(hostfile)] if "Open MPI" in flavour else ["-f", str(hostfile)]
    env["MASTER_PORT"] = str(_free_port())
    proc = subprocess.run([_mpi_launcher(), *hosts, "-n", "2", sys.executable, str(PROBE), "sft", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    world_sft = sum(1 for _ in open(root / "world" / "data" / "sft_train.jsonl", encoding="utf-8"))
    _assert_trained_with_two_processes(root / "sft", world_sft, SFT_BATCH)
    _assert_loadable(root / "sft" / "model")
    # Both ranks knew their place before the first write: ranks 0 and 1 of a world of 2.
    assert {(w["rank"], w["world"]) for w in _writes(log)} <= {(0, 2), (1, 2)}
    assert {w["rank"] for w in _writes(log)} >= {0}
