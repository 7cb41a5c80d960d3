"""sft and align with the online merging optimizers under DeepSpeed ZeRO, 2 CPU processes, through
`accelerate launch --config_file configs/accelerate/zero{2,3}.yaml`, on the tiny world.

world and pretrain run in this process; then, each as `accelerate launch ... -m taxfree <stage>`
through tests/helpers_launch_probe.py (rank-tagged write log, plus a log of what every rank's
Trainer trained with: $TAXFREE_PROBE_TRAIN_LOG):

- sft under ZeRO-3 with OnTIES (reserve_p 0.3: the top-k threshold is found across the ranks);
- align (dpo x ondare, onties; reserve_p 1, alpha 0.05 with merging) under ZeRO-2;
- the same align from the same SFT model under ZeRO-3, and under plain DDP (torchrun on gloo, as
  tests/test_multiprocess_stages.py launches it): the reference the ZeRO runs must equal.

The launches are what a user runs (README "Two CPU processes"): the DeepSpeed configs with
`--num_processes 2`, from the repository root (the accelerate configs name their DeepSpeed JSON
relative to it), no GPU (CUDA_VISIBLE_DEVICES empty) and no ACCELERATE_USE_CPU (accelerate would
then train without DeepSpeed; the stages refuse it). What DeepSpeed needs on CPU processes the
stages set themselves (taxfree.stages.common.deepspeed_cpu_kwargs).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
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
MERGING = ("ondare", "onties")
OURS = {"ondare": "OnDAREAdamW", "onties": "OnTIESAdamW"}
ZERO_OPTIMIZER = {1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


def _experiment(run_dir: Path, sft_tau: tuple[Path, Path] | None = None) -> dict:
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(run_dir)
    data["pretrain"]["epochs"] = 2
    data["sft"].update(epochs=1, batch_size=SFT_BATCH, save_steps=1000)
    if sft_tau is not None:
        ref, base = sft_tau
        data["sft"]["optimizer"] = {"name": "onties", "ref": str(ref), "base": str(base), "reserve_p": 0.3,
                                    "alpha": 0.05}
    # reserve_p 1: nothing random, so the ZeRO runs can equal the DDP run; alpha > 0 with merging,
    # so tau (sharded under ZeRO) enters every step.
    data["align"] = {
        "methods": ["dpo"], "optimizers": list(MERGING), "epochs": 1, "lr": 1.0e-3,
        "batch_size": ALIGN_BATCH, "max_length": 48, "max_prompt_length": 24, "logging_steps": 4,
        "save_steps": 1000, "optimizer": {"reserve_p": 1.0, "alpha": 0.05},
    }
    return data


def _launch(stage: str, config: Path, logs: Path, backend: str) -> None:
    """backend: zero2 / zero3 (configs/accelerate/<backend>.yaml), zero1 (zero2.yaml with
    configs/deepspeed/zero1.json, as a user picks ZeRO-1) or ddp."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", TAXFREE_PROBE_LOG=str(logs / f"{stage}.writes.jsonl"),
               TAXFREE_PROBE_TRAIN_LOG=str(logs / f"{stage}.train.jsonl"),
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    if backend == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
        how = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    elif backend == "zero1":
        how = ["--config_file", str(REPO / "configs" / "accelerate" / "zero2.yaml"),
               "--deepspeed_config_file", str(REPO / "configs" / "deepspeed" / "zero1.json")]
    else:
        how = ["--config_file", str(REPO / "configs" / "accelerate" / f"{backend}.yaml")]
    cmd = [str(ACCELERATE), "launch", *how, "--num_processes", str(WORLD), "--num_machines", "1",
           "--main_process_port", "0", str(PROBE), stage, str(config)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{backend} {stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def _copy_run(tmp: Path, name: str, source_root: Path) -> Path:
    """A run of its own holding copies of the finished world, pretrain and sft; returns its run_dir."""
    run_dir = tmp / name / "runs"
    for stage in ("world", "pretrain", "sft"):
        shutil.copytree(source_root / stage, run_dir / "t" / stage)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"zero1" | "zero2" | "zero3" | "ddp": {"root", "writes", "train"}}: each align launch's run root and its
    probe logs (writes; what trained); "zero2" is the main run, which also holds the ZeRO-3 sft
    ("sft_writes", "sft_train") that all three align runs start from."""
    import torch
    from transformers import AutoModelForCausalLM

    from taxfree.cli import main

    if not ACCELERATE.is_file():
        pytest.skip("accelerate launcher not installed")
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("ds")
    run_dir = tmp / "main" / "runs"
    assert main(["run", str(write_config(tmp, _experiment(run_dir), "upstream.yaml")),
                 "--stages", "world,pretrain"]) == 0
    root = run_dir / "t"
    # SFT's tau = ref - base: base = the pretrained model SFT starts from, ref = a nudged copy of it.
    model = AutoModelForCausalLM.from_pretrained(root / "pretrain" / "model")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp / "tau_ref")
    tau = (tmp / "tau_ref", root / "pretrain" / "model")

    out = {}
    logs = tmp / "main"
    config = write_config(tmp / "main", _experiment(run_dir, tau))
    _launch("sft", config, logs, "zero3")
    _launch("align", config, logs, "zero2")
    out["zero2"] = {"root": root, "sft_writes": _jsonl(logs / "sft.writes.jsonl"),
                    "sft_train": _jsonl(logs / "sft.train.jsonl")}
    for backend in ("zero1", "zero3", "ddp"):
        copy_dir = _copy_run(tmp, backend, root)
        _launch("align", write_config(tmp / backend, _experiment(copy_dir, tau)), tmp / backend, backend)
        out[backend] = {"root": copy_dir / "t"}
    for backend, logs in (("zero2", tmp / "main"), ("zero1", tmp / "zero1"), ("zero3", tmp / "zero3"),
                          ("ddp", tmp / "ddp")):
        out[backend].update(writes=_jsonl(logs / "align.writes.jsonl"), train=_jsonl(logs / "align.train.jsonl"))
    return out


# ----- helpers -----------------------------------------------------------------------------------


def _manifest(path: Path) -> dict:
    return json.loads((path / "stage.json").read_text(encoding="utf-8"))


def _lines(path: Path) -> int:
    return sum(1 for _ in open(path, encoding="utf-8"))


def _checkpoint(stage_dir: Path) -> Path:
    ckpts = sorted((stage_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts, f"no checkpoint under {stage_dir}"
    return ckpts[-1]


def _assert_two_processes_trained(stage_dir: Path, examples: int, per_device: int, deepspeed: bool) -> dict:
    m = _manifest(stage_dir)["metrics"]
    assert m["train_examples"] == examples
    # One optimizer step per global batch of WORLD x per-device examples (one process: twice as many).
    assert m["steps"] == math.ceil(examples / (per_device * WORLD)) != math.ceil(examples / per_device)
    ckpt = _checkpoint(stage_dir)
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == m["steps"] and state["train_batch_size"] == per_device
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    # DeepSpeed saved its own checkpoint, one optimizer partition per rank.
    parts = sorted(p.name for p in ckpt.glob(f"global_step{m['steps']}/*optim_states.pt"))
    assert len(parts) == (WORLD if deepspeed else 0), parts
    return m


def _trained_with(records: list[dict], stage_dir: Path) -> list[dict]:
    """The probe's records of the Trainer runs that wrote `stage_dir`'s checkpoints, one a rank."""
    mine = [r for r in records if r["output_dir"] == str(stage_dir / "checkpoints")]
    assert sorted((r["rank"], r["world"]) for r in mine) == [(0, WORLD), (1, WORLD)], mine
    return mine


def _assert_our_optimizer(records: list[dict], name: str, steps: int, zero_stage: int | None) -> None:
    """Every rank stepped our optimizer `steps` times; under ZeRO inside DeepSpeed's ZeRO optimizer,
    on this rank's partition of the parameters (so tau was sharded), otherwise on all of them."""
    for r in records:
        assert r["optimizers"][-1] == OURS[name], r["optimizers"]  # not DeepSpeed's or torch's AdamW
        assert r["group_steps"] and set(r["group_steps"]) == {steps}, r
        assert r["tau_held"] == r["held"], r  # tau lies in the layout of what the optimizer steps on
        if zero_stage is None:
            assert r["distributed_type"] == "DistributedType.MULTI_CPU" and r["zero_stage"] is None
            assert r["held"] == r["parameters"] and r["partitions"] == 0
        else:
            assert r["distributed_type"] == "DistributedType.DEEPSPEED", r
            assert r["engine"] == "DeepSpeedEngine" and r["zero_stage"] == zero_stage
            assert ZERO_OPTIMIZER[zero_stage] in r["optimizers"], r["optimizers"]
            assert r["partitions"] >= 1 and r["held"] < r["parameters"], r
    if zero_stage is not None:  # the partitions cover the model (ZeRO may pad them a little)
        total = sum(r["held"] for r in records)
        assert records[0]["parameters"] <= total <= records[0]["parameters"] + 64 * WORLD, records


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def _assert_loadable_and_trained(model_dir: Path, start_dir: Path) -> dict:
    """A normal HF checkpoint (full weights, fp32), finite outputs, different from where it started."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(tok("hello", return_tensors="pt")["input_ids"]).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    after, before = _weights(model_dir), _weights(start_dir)
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert v.shape == before[k].shape and v.dtype == torch.float32 and torch.isfinite(v).all(), k
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-3
    return after


# ----- the tests ---------------------------------------------------------------------------------


def test_sft_under_zero3_trains_with_onties(runs):
    root = runs["zero2"]["root"]
    sft = root / "sft"
    m = _assert_two_processes_trained(sft, _lines(root / "world" / "data" / "sft_train.jsonl"), SFT_BATCH,
                                      deepspeed=True)
    # Evaluated before training (transformers cannot under ZeRO without help) and after: it learned.
    assert m["optimizer"] == "onties"
    # zero3.yaml's zero3_init_flag: the model was built already partitioned (deepspeed.zero.Init)
    assert m["loaded_partitioned"] is True
    assert math.isfinite(m["eval_loss_before"]) and m["eval_loss"] < m["eval_loss_before"]
    _assert_our_optimizer(_trained_with(runs["zero2"]["sft_train"], sft), "onties", m["steps"], zero_stage=3)
    # ZeRO-3 saved full weights (gathered from the partitions), not empty placeholders.
    _assert_loadable_and_trained(sft / "model", root / "pretrain" / "model")


@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3", "ddp"])
@pytest.mark.parametrize("name", MERGING)
def test_align_trains_with_our_optimizer(runs, backend, name):
    run = runs[backend]
    root = run["root"]
    vdir = root / "align" / f"dpo-{name}"
    zero = {"zero1": 1, "zero2": 2, "zero3": 3, "ddp": None}[backend]
    m = _assert_two_processes_trained(vdir, _lines(root / "world" / "data" / "pref_train.jsonl"), ALIGN_BATCH,
                                      deepspeed=zero is not None)
    assert m["optimizer"] == name and math.isfinite(m["train_loss"])
    assert m["loaded_partitioned"] is (zero == 3)  # every variant under zero3.yaml, none elsewhere
    _assert_our_optimizer(_trained_with(run["train"], vdir), name, m["steps"], zero_stage=zero)
    _assert_loadable_and_trained(vdir / "model", root / "sft" / "model")


@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3"])
@pytest.mark.parametrize("name", MERGING)
def test_zero_result_equals_ddp(runs, backend, name):
    """Same SFT start, data, seed and optimizer settings: ZeRO's sharded optimizer (tau cut into the
    ranks' partitions, per-tensor quantities reduced across them) gives DDP's model to fp32 rounding,
    and the same training and eval metrics."""
    import torch

    variant = f"dpo-{name}"
    got = _weights(runs[backend]["root"] / "align" / variant / "model")
    ddp = _weights(runs["ddp"]["root"] / "align" / variant / "model")
    other = _weights(runs["ddp"]["root"] / "align" / f"dpo-{next(o for o in MERGING if o != name)}" / "model")
    for k in ddp:
        torch.testing.assert_close(got[k], ddp[k], rtol=1e-5, atol=1e-6, msg=f"{backend} {variant} {k}")
    # The tolerance means something: the two optimizers' models are much further apart.
    assert max((ddp[k] - other[k]).abs().max().item() for k in ddp) > 1e-4
    zm, dm = (_manifest(runs[b]["root"] / "align" / variant)["metrics"] for b in (backend, "ddp"))
    for key in ("train_loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert zm[key] == pytest.approx(dm[key], rel=1e-4, abs=1e-6), key


def test_only_the_main_process_writes_results(runs):
    launches = {f"{b}/align": runs[b]["writes"] for b in ("zero1", "zero2", "zero3", "ddp")}
    launches["zero3/sft"] = runs["zero2"]["sft_writes"]
    for launch, writes in launches.items():
        manifests = [w["path"] for w in writes if w["op"] == "file" and w["path"].endswith("/stage.json")]
        assert manifests, f"{launch}: no stage.json write recorded"
        assert all(w["world"] == WORLD for w in writes), f"{launch}: {writes}"
        assert {w["rank"] for w in writes} == {0}, f"{launch}: other ranks wrote results: {writes}"
        assert len(manifests) == len(set(manifests)), f"{launch}: a stage.json was written twice: {manifests}"
        models = [w["path"] for w in writes if w["op"] == "dir" and w["path"].endswith("/model")]
        assert len(models) == len(set(models)), f"{launch}: a model was written twice: {models}"
    root = runs["zero2"]["root"]
    for stage_dir in (root / "sft", *(root / "align" / f"dpo-{n}" for n in MERGING)):
        assert len(list((stage_dir / "tb").glob("events.out.tfevents.*"))) == 1, stage_dir
        assert not (stage_dir / "checkpoints" / "runs").exists()  # the evaluation after training went to tb/ too


def test_deepspeed_on_cpu_settings(monkeypatch):
    """What the stages add for a DeepSpeed launch without a GPU, and the ACCELERATE_USE_CPU refusal."""
    import torch

    from taxfree.errors import TaxfreeError
    from taxfree.stages.common import deepspeed_cpu_kwargs

    ops = pytest.importorskip("deepspeed.ops")
    if torch.cuda.is_available():
        pytest.skip("a GPU: DeepSpeed runs there as it is")
    monkeypatch.delitem(vars(ops), "__compatible_ops__", raising=False)  # not probed yet (restored after)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert deepspeed_cpu_kwargs() == {}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert deepspeed_cpu_kwargs() == {"use_cpu": True}
    assert vars(ops)["__compatible_ops__"] == {}  # no op probed for, none JIT-built
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(TaxfreeError, match="ACCELERATE_USE_CPU=true with a DeepSpeed launch"):
        deepspeed_cpu_kwargs()
