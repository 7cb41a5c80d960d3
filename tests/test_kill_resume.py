"""Kill and resume (issue 9, DESIGN "Config and runs"): `kill -9` a stage part-way through, run
the same command again, and it finishes with the result of an uninterrupted run.

Each case has an uninterrupted reference run, copies its finished upstream stages into a second
run directory, starts the stage there as a user would (`python -m taxfree run`), SIGKILLs it as
soon as it has saved some progress, checks that nothing claims to be finished (no manifest, the
start marker, no final output), and runs the command again. The second run must say it resumes
and must not start over (checked per stage), and on CPU its result is bitwise the reference's:

- pretrain, sft, rm, align (dpo with adamw, ondare, onties; exo-pref with adamw, on our
  ContrastiveTrainer): the model weights (the Trainer restores
  model, optimizer, scheduler, RNG state and data position) and every metric (train_loss to
  1e-9: it is rebuilt from the checkpoint's log history).
- sample: rw.jsonl and collected.jsonl byte for byte (each chunk of prompts has its own seed;
  finished chunks are kept, not sampled again).
- ama: the merged weights and ama_weights.json (the logits, AdamW state and step are restored).
- evaluate: every number of results.json (finished models' results are kept, not recomputed).

The pretrain and sft cases run their own reference (their stage is the long one there); the
others share one reference run of every later stage (`downstream`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_EXPERIMENT, write_config
from taxfree.pipeline.manifest import MANIFEST, STARTED, read_manifest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
DOWNSTREAM = ["world", "pretrain", "sft", "rm", "sample", "align", "ama", "evaluate"]


def _config(run_dir: Path, stage: str | None = None) -> dict:
    """The stage under test long enough to be killed mid-way (a few seconds, progress saved every
    few steps); the stages before it short. The downstream stages' settings do not depend on
    `stage`, so one reference run serves all their cases."""
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(run_dir)
    long = stage == "pretrain"
    data["pretrain"].update(epochs=1, max_steps=120 if long else 40, save_steps=20 if long else 1000, logging_steps=10,
                            save_total_limit=2)
    long = stage == "sft"
    data["sft"].update(epochs=1, max_steps=60 if long else 12, save_steps=10 if long else 1000, logging_steps=5,
                       save_total_limit=2)
    data["rm"] = {"epochs": 1, "max_steps": 30, "save_steps": 5, "logging_steps": 5, "save_total_limit": 2,
                  "lr": 3e-3, "batch_size": 8, "max_length": 96}
    # 9 chunks of 8 prompts (the 96 pairs have 66 prompts), a fraction of a second each.
    data["sample"] = {"num_completions": 4, "max_new_tokens": 24, "max_prompts": 96, "chunk_size": 8,
                      "batch_size": 16, "score_batch_size": 16}
    # Every optimizer in the reference (a variant's key does not depend on its siblings); a case
    # selects its own with --set align.optimizers=[...].
    data["align"] = {"methods": ["dpo"], "optimizers": ["adamw", "ondare", "onties"], "epochs": 1, "max_steps": 12,
                     "save_steps": 4, "logging_steps": 2, "lr": 5e-4, "batch_size": 4, "max_length": 64,
                     "max_prompt_length": 32, "optimizer": {"reserve_p": 0.3, "alpha": 0.05}}
    # 5 epochs of 33 batches of the 66 collected examples, the state saved every 4 steps.
    data["ama"] = {"aligned": ["dpo-adamw"], "blocks": "block3", "lr": 0.2, "epochs": 5, "batch_size": 2,
                   "max_length": 64, "save_steps": 4}
    # Three models (sft, align/dpo-adamw, ama/dpo-adamw), about a second each.
    data["evaluate"] = {"models": ["align/dpo-adamw", "ama/dpo-adamw"], "max_new_tokens": 8, "batch_size": 8,
                        "benchmark_batch_size": 16}
    return data


def _taxfree(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "taxfree", *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))


def _run(args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "taxfree", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _first_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """A checkpoint the resume will use: transformers writes trainer_state.json last and in place,
    so the file existing is not enough (a kill while it is being written leaves a partial one,
    and the product then rightly discards the checkpoint): it must parse."""
    if not ckpt_dir.is_dir():
        return None
    for d in sorted(ckpt_dir.glob("checkpoint-*")):
        try:
            json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return d
    return None


def _kill_when(cmd, ready: Callable[[], object], log: Path, what: str, timeout: float = 120.0):
    """Run `taxfree cmd` and SIGKILL it as soon as `ready()` returns something; that is returned."""
    proc = _taxfree(cmd, log)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            found = ready()
            if found:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return found
            if proc.poll() is not None:
                pytest.fail(f"the stage ended (rc {proc.returncode}) before {what} was seen:\n{log.read_text()}")
            time.sleep(0.005)
        pytest.fail(f"no {what} within the time limit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@dataclass
class Killed:
    ref: Path  # the reference's output of the stage (or variant)
    out: Path  # the killed run's output of the stage (or variant)
    root: Path  # the killed run's root
    ref_root: Path
    cmd: list
    found: object  # what ready() returned when the run was killed
    label: str  # "<stage>[/<variant>]", as the log names it


def _kill(tmp_path, stages: list[str], stage: str, overrides=(), variant: str | None = None, *,
          reference: Path | None = None,
          ready: Callable[[Path], object] = lambda out: _first_complete_checkpoint(out / "checkpoints"),
          what: str = "a complete checkpoint", unfinished=("model",)) -> Killed:
    """Kill the stage part-way through in a fresh run directory whose upstream stages are the
    reference's. The reference: `reference` (a finished run root of the same config), else a run
    made here. `ready(out)` says when enough progress is saved; `unfinished` names outputs that
    must not exist after the kill."""
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    sets = [a for o in overrides for a in ("--set", o)]
    upstream_stages = stages[: stages.index(stage)]
    if reference is None:
        ref_cfg = write_config(tmp_path / "ref-cfg", _config(ref_dir, stage))
        _run(["run", ref_cfg, "--stages", ",".join(stages), *sets])
        reference = ref_dir / "t"
    killed_cfg = write_config(tmp_path / "killed-cfg", _config(killed_dir, stage))
    killed = killed_dir / "t"
    for s in upstream_stages:  # finished upstream stages, same keys and run ids
        shutil.copytree(reference / s, killed / s)

    out = killed / stage / variant if variant else killed / stage
    cmd = ["run", killed_cfg, "--stages", ",".join(stages), *sets]
    found = _kill_when(cmd, lambda: ready(out), tmp_path / "killed.log", what)
    # Killed mid-way: the start marker and saved progress, nothing that looks finished.
    assert not (out / MANIFEST).exists() and not (killed / stage / MANIFEST).exists()
    assert (out / STARTED).is_file()
    for name in unfinished:
        assert not (out / name).exists(), name
    label = f"{stage}/{variant}" if variant else stage
    return Killed(reference / stage / variant if variant else reference / stage, out, killed, reference, cmd, found,
                  label)


def _resume(k: Killed) -> str:
    """Run the killed command again; it must resume and finish. Returns its log."""
    r = _run(k.cmd)
    assert f"{k.label}: resuming" in r.stderr
    assert (k.out / MANIFEST).is_file()
    assert read_manifest(k.ref)["key"] == read_manifest(k.out)["key"]
    return r.stderr


def _kill_and_resume(tmp_path, stages: list[str], stage: str, overrides=(), variant: str | None = None,
                     **kwargs) -> tuple[Path, Path]:
    """A training stage killed after its first complete checkpoint and resumed:
    (the reference's output, the resumed run's output)."""
    k = _kill(tmp_path, stages, stage, overrides, variant, **kwargs)
    assert k.found.is_dir()
    _resume(k)
    return k.ref, k.out


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


def _stamp(path: Path) -> tuple[int, int]:
    """A file rewritten (even with the same bytes) gets a new inode (atomic writes) and mtime."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@pytest.fixture(scope="module")
def downstream(tmp_path_factory) -> Path:
    """One uninterrupted run of every stage from world to evaluate: the reference of the cases
    below sft (and their upstream stages)."""
    tmp = tmp_path_factory.mktemp("downstream")
    cfg = write_config(tmp / "cfg", _config(tmp / "runs"))
    _run(["run", cfg, "--stages", ",".join(DOWNSTREAM)])
    return tmp / "runs" / "t"


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
def test_rm_resumes_to_the_uninterrupted_result(tmp_path, downstream):
    ref, out = _kill_and_resume(tmp_path, ["world", "pretrain", "sft", "rm"], "rm", reference=downstream)
    _assert_same_result(ref, out)
    assert read_manifest(out)["metrics"]["steps"] == 30


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "ondare", "onties"])
def test_align_resumes_to_the_uninterrupted_result(tmp_path, downstream, optimizer):
    # The reference's dpo-<optimizer> is the same variant (same key) as the one run alone here.
    overrides = [f"align.optimizers=[{optimizer}]", "ama.aligned=null"]  # ama names dpo-adamw: not here
    ref, out = _kill_and_resume(tmp_path, ["world", "pretrain", "sft", "align"], "align", overrides,
                                variant=f"dpo-{optimizer}", reference=downstream)
    _assert_same_result(ref, out)
    assert read_manifest(out)["metrics"]["steps"] == 12


@pytest.mark.slow
def test_contrastive_align_resumes_to_the_uninterrupted_result(tmp_path):
    """A method of our ContrastiveTrainer (exo-pref; kto-pair and the K-way EXO family run on the
    same trainer) resumes like TRL's: bitwise the uninterrupted weights."""
    overrides = ["align.methods=[exo-pref]", "align.optimizers=[adamw]", "ama.aligned=null"]
    ref, out = _kill_and_resume(tmp_path, ["world", "pretrain", "sft", "align"], "align", overrides,
                                variant="exo-pref-adamw")
    _assert_same_result(ref, out)
    assert read_manifest(out)["metrics"]["steps"] == 12


def _chunks(out: Path) -> list[Path]:
    d = out / "chunks"
    return sorted(d.glob("[0-9]*.jsonl")) if d.is_dir() else []


@pytest.mark.slow
def test_sample_resumes_to_the_uninterrupted_result(tmp_path, downstream):
    k = _kill(tmp_path, DOWNSTREAM[: DOWNSTREAM.index("sample") + 1], "sample", reference=downstream,
              ready=_chunks, what="a finished chunk", unfinished=("rw.jsonl", "collected.jsonl"))
    done = {p.name: _stamp(p) for p in _chunks(k.out)}
    total = len(_chunks(k.ref))
    assert total == -(-read_manifest(k.ref)["metrics"]["prompts"] // 8) >= 4
    assert 0 < len(done) < total  # killed part-way

    log = _resume(k)
    assert f"sample: {len(done)}/{total} chunks already done, continuing" in log
    after = {p.name: _stamp(p) for p in _chunks(k.out)}
    assert len(after) == total and all(after[name] == stamp for name, stamp in done.items())  # not sampled again
    for name in ("rw.jsonl", "collected.jsonl"):
        assert (k.out / name).read_bytes() == (k.ref / name).read_bytes(), name
    for p in _chunks(k.ref):
        assert (k.out / "chunks" / p.name).read_bytes() == p.read_bytes(), p.name
    assert read_manifest(k.out)["metrics"] == read_manifest(k.ref)["metrics"]


@pytest.mark.slow
def test_ama_resumes_to_the_uninterrupted_result(tmp_path, downstream):
    from taxfree.stages.ama import STATE_NAME

    k = _kill(tmp_path, DOWNSTREAM[: DOWNSTREAM.index("ama") + 1], "ama", variant="dpo-adamw", reference=downstream,
              ready=lambda out: (out / STATE_NAME).is_file(), what=f"an {STATE_NAME}",
              unfinished=("model", "ama_weights.json"))
    assert not (k.root / "ama" / MANIFEST).exists() and (k.root / "ama" / STARTED).is_file()
    _resume(k)
    _assert_same_result(k.ref, k.out)
    m = read_manifest(k.out)["metrics"]
    assert m["steps"] == 5 * -(-m["examples"] // 2)  # the whole run: 5 epochs of batches of 2
    for name in ("ama_weights.json", "model/ama_weights.json"):
        assert (k.out / name).read_bytes() == (k.ref / name).read_bytes(), name
    assert not (k.out / STATE_NAME).exists()  # the training state goes once the model is written


def _model_results(out: Path) -> dict[str, Path]:
    """evaluate/<model-id>/results.json of the models evaluated so far, by model id."""
    found = {}
    for p in out.rglob("results.json"):
        if p.parent != out:
            found[p.parent.relative_to(out).as_posix()] = p
    return found


def _portable(results_json: Path, root: Path) -> dict:
    """results.json with the run directory written as ROOT (the runs live in different places)."""
    return json.loads(results_json.read_text(encoding="utf-8").replace(str(root), "ROOT"))


@pytest.mark.slow
def test_evaluate_resumes_without_redoing_finished_models(tmp_path, downstream):
    k = _kill(tmp_path, DOWNSTREAM, "evaluate", reference=downstream,
              ready=lambda out: (out / "sft" / "results.json").is_file(), what="the SFT model's results",
              unfinished=("results.json",))
    models = [m["id"] for m in json.loads((k.ref / "results.json").read_text())["models"]]
    assert models == ["sft", "align/dpo-adamw", "ama/dpo-adamw"]
    done = {mid: (_stamp(p), _stamp(p.parent / "responses.jsonl")) for mid, p in _model_results(k.out).items()}
    assert "sft" in done and len(done) < len(models)  # killed part-way

    log = _resume(k)
    for mid, stamps in done.items():  # finished models are read back, not evaluated again
        assert f"evaluate/{mid}: up to date" in log
        p = k.out / mid / "results.json"
        assert (_stamp(p), _stamp(p.parent / "responses.jsonl")) == stamps, mid
    res, ref = _portable(k.out / "results.json", k.root), _portable(k.ref / "results.json", k.ref_root)
    assert sorted(res.pop("evaluated_this_run")) == sorted(set(models) - set(done))
    assert ref.pop("evaluated_this_run") == models
    assert res == ref
    for mid in models:
        assert (k.out / mid / "responses.jsonl").read_bytes() == (k.ref / mid / "responses.jsonl").read_bytes(), mid
    ma, mb = read_manifest(k.ref)["metrics"], read_manifest(k.out)["metrics"]
    assert ma.pop("evaluated") == len(models) and mb.pop("evaluated") == len(models) - len(done)
    assert ma == mb


def test_a_checkpoint_killed_while_saving_is_not_resumed_from(tmp_path):
    """checkpoint-N without trainer_state.json (written last) is a half-saved one: skipped, removed."""
    from taxfree.pipeline.rundir import last_checkpoint

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
