"""Determinism (issue 9): the same config run twice gives the same bytes of data, the same
weights and the same metrics; each stage.json says with which versions, seed and config."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_EXPERIMENT, write_config
from taxfree.pipeline.config import load_config
from taxfree.pipeline.manifest import read_manifest
from taxfree.pipeline.runner import Runner

STAGES = ["world", "pretrain", "sft"]


def _run(tmp_path, name: str):
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp_path / name)
    data["pretrain"].update(epochs=1, max_steps=12, save_steps=5)
    data["sft"].update(epochs=1, max_steps=6, save_steps=4)
    path = write_config(tmp_path / f"{name}-cfg", data)
    Runner(load_config(path)).run(STAGES)
    return tmp_path / name / "t"


def _files(root, sub):
    return {p.relative_to(root / sub): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / sub).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_same_config_twice_gives_identical_results(tmp_path):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")

    # The world: byte for byte, tokenizer included.
    assert _files(a, "world/data") == _files(b, "world/data")
    for stage in ("pretrain", "sft"):
        wa = load_file(a / stage / "model" / "model.safetensors")
        wb = load_file(b / stage / "model" / "model.safetensors")
        assert wa.keys() == wb.keys() and len(wa) > 5
        for name in wa:
            assert torch.equal(wa[name], wb[name]), f"{stage}: {name} differs"
        ma, mb = read_manifest(a / stage), read_manifest(b / stage)
        assert ma["metrics"] == mb["metrics"]  # float for float, not approximately
        assert ma["config"] == mb["config"] and ma["config_hash"] == mb["config_hash"]
        assert ma["run_id"] != mb["run_id"]  # two runs, two identities
    # The SFT model learnt something, so equal weights are not the equality of two no-ops.
    assert read_manifest(a / "sft")["metrics"]["eval_loss"] < read_manifest(a / "sft")["metrics"]["eval_loss_before"]

    # What stage.json records: versions, seed, the resolved config of the stage and the experiment.
    m = read_manifest(a / "sft")
    for pkg in ("python", "torch", "transformers", "trl", "accelerate", "datasets", "safetensors", "taxfree"):
        assert m["versions"].get(pkg), pkg
    assert m["versions"]["torch"] == torch.__version__.split("+")[0] or m["versions"]["torch"] == torch.__version__
    assert m["seed"] == 0 and m["config"]["seed"] == 0
    assert m["config"]["sft"]["max_steps"] == 6 and m["config"]["sft"]["lr"] == pytest.approx(2e-3)
    exp = m["experiment"]
    assert exp["run_dir"] == str(tmp_path / "a") and exp["sft"]["max_steps"] == 6
    assert exp["models"]["trust_remote_code"] is False
    assert exp["sft"]["optimizer"]["betas"] == [0.9, 0.999]  # defaults are written out, not implied
    assert m["metrics"]["steps"] == 6
