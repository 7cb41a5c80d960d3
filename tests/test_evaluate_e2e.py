"""evaluate + report end to end on the tiny world (world, pretrain, sft, rm, align with dpo): real numbers."""

import copy
import json
import math

import pytest

from conftest import TINY_EXPERIMENT, write_config
from taxfree.cli import main
from taxfree.data.records import read_jsonl
from taxfree.data.tiny_world import gold_reward
from taxfree.pipeline.config import load_config
from taxfree.pipeline.manifest import read_manifest
from taxfree.pipeline.runner import Runner

pytestmark = pytest.mark.slow


def test_evaluate_and_report_on_the_tiny_world(tmp_path, capsys):
    data = copy.deepcopy(TINY_EXPERIMENT)
    data["run_dir"] = str(tmp_path / "runs")
    data["rm"] = {"epochs": 1, "lr": 3e-3, "batch_size": 16, "max_length": 96, "save_steps": 1000, "logging_steps": 5}
    data["align"] = {"methods": ["dpo"], "optimizers": ["adamw"], "max_steps": 4, "lr": 2e-3, "batch_size": 8,
                     "max_length": 96, "max_prompt_length": 48, "save_steps": 1000, "logging_steps": 2}
    data["evaluate"] = {"max_new_tokens": 12, "batch_size": 8, "benchmark_batch_size": 16}
    path = write_config(tmp_path, data)
    root = tmp_path / "runs" / "t"
    Runner(load_config(path)).run(["world", "pretrain", "sft", "rm", "align", "evaluate", "report"])

    res = json.loads((root / "evaluate" / "results.json").read_text())
    rows = {r["id"]: r for r in res["models"]}
    assert list(rows) == ["sft", "align/dpo-adamw"]
    for mid, r in rows.items():
        assert math.isfinite(r["reward"]) and math.isfinite(r["gold_reward"])
        for task in ("tiny_knowledge", "tiny_arithmetic"):
            assert 0.0 <= r["benchmarks"][task]["acc"] <= 1.0
            assert r["scores"][task] == pytest.approx(100 * r["benchmarks"][task]["acc"])
        lines = read_jsonl(root / "evaluate" / mid / "responses.jsonl")
        assert len(lines) == 8  # every held-out prompt
        # The stored gold reward is the mean of the responses' gold rewards.
        assert r["gold_reward"] == pytest.approx(sum(gold_reward(x["response"]) for x in lines) / 8)
        assert r["reward"] == pytest.approx(sum(x["reward"] for x in lines) / 8)

    report = json.loads((root / "results.json").read_text())
    rep = {r["id"]: r for r in report["models"]}
    assert rep["sft"]["tax_average"] == 0.0
    dpo = rep["align/dpo-adamw"]
    assert dpo["tax_average"] == pytest.approx(rep["sft"]["benchmark_average"] - dpo["benchmark_average"])
    md = (root / "report.md").read_text()
    assert "| `align/dpo-adamw` |" in md and "tiny_knowledge (%)" in md
    assert (root / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert read_manifest(root / "report") is not None

    # Greedy generation is deterministic: the same responses again (forced re-evaluation).
    before = (root / "evaluate" / "sft" / "responses.jsonl").read_text()
    Runner(load_config(path), force=True).run(["evaluate"])
    assert (root / "evaluate" / "sft" / "responses.jsonl").read_text() == before

    # The command form on the run directory.
    assert main(["report", str(root)]) == 0
    assert str(root / "pareto.png") in capsys.readouterr().out
