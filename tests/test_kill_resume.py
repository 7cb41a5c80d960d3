"""Kill and resume (issue 9, DESIGN "Config and runs"): `kill -9` a training stage once it has
written a checkpoint, run the same command again, and it finishes with the result of an
uninterrupted run.

Each case runs the uninterrupted reference in one run directory, copies its finished upstream
stages into a second one, starts the stage there as a user would (`python -m taxfree run`),
SIGKILLs it as soon as its first checkpoint is complete, checks that nothing claims to be
finished, and runs the command again. On CPU the resumed weights are bitwise equal to the
reference (the Trainer restores model, optimizer, scheduler, RNG state and data position).
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_EXPERIMENT, write_config
from taxfree.pipeline.manifest import MANIFEST, STARTED, read_manifest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _config(run_dir: Path, stage: str) -> dict:
    """The stage under test long enough to be killed mid-way (a few seconds, a checkpoint every
    few steps); the stages before it short."""
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(run_dir)
    long = stage == "pretrain"
    data["pretrain"].update(epochs=1, max_steps=120 if long else 40, save_steps=20 if long else 1000, logging_steps=10,
                            save_total_limit=2)
    long = stage == "sft"
    data["sft"].update(epochs=1, max_steps=60 if long else 12, save_steps=10 if long else 1000, logging_steps=5,
                       save_total_limit=2)
    data["align"] = {"methods": ["dpo"], "optimizers": ["adamw"], "epochs": 1, "max_steps": 24, "save_steps": 6,
                     "logging_steps": 3, "lr": 5e-4, "batch_size": 4, "max_length": 64, "max_prompt_length": 32,
                     "optimizer": {"reserve_p": 0.3, "alpha": 0.05}}
    return data


def _taxfree(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "taxfree", *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def _first_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    for d in sorted(ckpt_dir.glob("checkpoint-*")):
        if (d / "trainer_state.json").is_file():
            return d
    return None


def _kill_after_first_checkpoint(cmd, ckpt_dir: Path, log: Path, timeout: float = 120.0) -> Path:
    proc = _taxfree(cmd, log)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            found = _first_complete_checkpoint(ckpt_dir)
            if found is not None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return found
            if proc.poll() is not None:
                pytest.fail(f"the stage ended (rc {proc.returncode}) before a checkpoint was seen:\n{log.read_text()}")
            time.sleep(0.005)
        pytest.fail("no checkpoint within the time limit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _kill_and_resume(tmp_path, stages: list[str], stage: str, overrides=(), variant: str | None = None):
    """Returns (reference run root, resumed run root, where the stage's outputs are below a root)."""
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    sets = [a for o in overrides for a in ("--set", o)]
    ref_cfg = write_config(tmp_path / "ref-cfg", _config(ref_dir, stage))
    killed_cfg = write_config(tmp_path / "killed-cfg", _config(killed_dir, stage))
    r = subprocess.run([sys.executable, "-m", "taxfree", "run", ref_cfg, "--stages", ",".join(stages), *sets],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, killed = ref_dir / "t", killed_dir / "t"
    for upstream in stages[: stages.index(stage)]:  # finished upstream stages, same keys and run ids
        shutil.copytree(ref / upstream, killed / upstream)

    out = killed / stage / variant if variant else killed / stage
    cmd = ["run", killed_cfg, "--stages", ",".join(stages), *sets]
    ckpt = _kill_after_first_checkpoint(cmd, out / "checkpoints", tmp_path / "killed.log")
    # Killed mid-way: a checkpoint and the start marker, no manifest, no model.
    assert not (out / MANIFEST).exists() and not (killed / stage / MANIFEST).exists()
    assert (out / STARTED).is_file() and ckpt.is_dir() and not (out / "model").exists()

    r = subprocess.run([sys.executable, "-m", "taxfree", *map(str, cmd)], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{stage}{'/' + variant if variant else ''}: resuming" in r.stderr
    assert (out / MANIFEST).is_file()
    return ref / stage / variant if variant else ref / stage, out


def _assert_same_result(ref: Path, out: Path):
    wa, wb = _weights(ref / "model"), _weights(out / "model")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name}: max |diff| {(wa[name] - wb[name]).abs().max().item():.3g}"
    ma, mb = read_manifest(ref)["metrics"], read_manifest(out)["metrics"]
    assert ma.keys() == mb.keys()
    # The second run resumed (it did not start over, which would give the same result too).
    assert ma["resumed_from_step"] == 0 and 0 < mb["resumed_from_step"] < mb["steps"]
    for k, v in ma.items():
        if k == "train_loss":  # the mean over every step, rebuilt from the checkpoint's log history
            assert mb[k] == pytest.approx(v, rel=1e-9, abs=0), k
        elif k != "resumed_from_step":
            assert mb[k] == v, k
    assert read_manifest(ref)["key"] == read_manifest(out)["key"]


@pytest.mark.slow
def test_pretrain_resumes_to_the_uninterrupted_result(tmp_path):
    ref, out = _kill_and_resume(tmp_path, ["world", "pretrain"], "pretrain")
    _assert_same_result(ref, out)
    assert read_manifest(out)["metrics"]["steps"] == 120


@pytest.mark.slow
def test_sft_resumes_to_the_uninterrupted_result(tmp_path):
    ref, out = _kill_and_resume(tmp_path, ["world", "pretrain", "sft"], "sft")
    _assert_same_result(ref, out)
    assert read_manifest(out)["metrics"]["steps"] == 60


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "ondare"])
def test_align_resumes_to_the_uninterrupted_result(tmp_path, optimizer):
    ref, out = _kill_and_resume(tmp_path, ["world", "pretrain", "sft", "align"], "align",
                                [f"align.optimizers=[{optimizer}]"], variant=f"dpo-{optimizer}")
    _assert_same_result(ref, out)


def test_a_checkpoint_killed_while_saving_is_not_resumed_from(tmp_path):
    """checkpoint-N without trainer_state.json (written last) is a half-saved one: skipped, removed."""
    from taxfree.stages.common import last_checkpoint

    ckpt = tmp_path / "checkpoints"
    assert last_checkpoint(tmp_path) is None
    (ckpt / "checkpoint-10").mkdir(parents=True)
    (ckpt / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    (ckpt / "checkpoint-20").mkdir()
    (ckpt / "checkpoint-20" / "model.safetensors").write_bytes(b"half")
    (ckpt / "checkpoint-30").mkdir()
    (ckpt / "checkpoint-30" / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert last_checkpoint(tmp_path) == str(ckpt / "checkpoint-10")
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-10"]
    (ckpt / "checkpoint-9").mkdir()
    (ckpt / "checkpoint-9" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(ckpt / "checkpoint-10")  # by number, not by name
