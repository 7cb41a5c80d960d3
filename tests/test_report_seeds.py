"""The report over seeds: means with t intervals, per-seed values kept, and the Comparisons
table answering the papers' questions on constructed results with known answers."""

import json
import math
import statistics

import pytest
from scipy import stats as sp

from taxfree.eval.report import gather, write_report

SWEEP = [0.25, 0.5, 0.75]


def model(mid, kind, reward, avg, aligned=None, w=None, gold=None):
    row = {"id": mid, "kind": kind, "reward": reward, "scores": {"k": avg, "a": avg}, "aligned": aligned,
           "aligned_weight": w}
    if gold is not None:
        row["gold_reward"] = gold
    return row


def seed_results(seed: int, ondare_gain: float, onties_gain: float, ama_gain: float) -> dict:
    """Sweeps from SFT (avg 40, reward 0) to each aligned model (avg 30, reward 3): reward falls
    linearly with the benchmark average. OnDARE's sweep lies `ondare_gain` higher at every average
    (but its SFT end), AMA `ama_gain` above the adamw sweep; a seed shifts every reward a little."""
    noise = 0.05 * seed
    rows = [model("sft", "sft", 0.0 + noise, 40.0, w=0.0)]
    for opt, gain in (("adamw", 0.0), ("ondare", ondare_gain), ("onties", onties_gain)):
        v = f"dpo-{opt}"
        rows.append(model(f"align/{v}", "align", 3.0 + gain + noise, 30.0, aligned=v, w=1.0))
        for w in SWEEP:
            rows.append(model(f"merge/{v}-w{w:g}", "merge", 3.0 * w + gain + noise, 40.0 - 10.0 * w, aligned=v, w=w))
    rows.append(model("ama/dpo-adamw", "ama", 1.5 + ama_gain + noise, 35.0, aligned="dpo-adamw"))
    return {"experiment": "t", "seed": seed, "baseline": "sft", "models": rows,
            "benchmarks": [{"task": "k", "metric": "acc"}, {"task": "a", "metric": "acc"}]}


def write_seeds(root, per_seed: dict[int, dict]):
    for k, res in per_seed.items():
        d = root / f"seed{k}" / "evaluate"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(res))


def test_means_and_intervals_over_seeds_by_hand(tmp_path):
    gains = {0: (0.50, 0.02, 0.30), 1: (0.60, -0.03, 0.25), 2: (0.55, 0.01, 0.35)}
    write_seeds(tmp_path, {k: seed_results(k, *g) for k, g in gains.items()})
    report = gather(tmp_path)  # the seed<k>/ directories are found
    assert report["seeds"] == [0, 1, 2]
    row = next(r for r in report["models"] if r["id"] == "align/dpo-ondare")
    rewards = [3.0 + gains[k][0] + 0.05 * k for k in (0, 1, 2)]
    assert row["per_seed"]["reward"] == {str(k): pytest.approx(v) for k, v in zip((0, 1, 2), rewards)}
    iv = row["intervals"]["reward"]
    low, high = sp.t.interval(0.95, 2, loc=statistics.mean(rewards), scale=sp.sem(rewards))
    assert row["reward"] == pytest.approx(statistics.mean(rewards))
    assert (iv["low"], iv["high"], iv["n"], iv["kind"]) == (pytest.approx(low), pytest.approx(high), 3, "t")
    assert row["tax_average"] == pytest.approx(10.0) and row["intervals"]["tax_average"]["high"] == pytest.approx(10.0)


def test_comparisons_answer_the_papers_questions(tmp_path):
    gains = {0: (0.50, 0.02, 0.30), 1: (0.60, -0.03, 0.25), 2: (0.55, 0.01, 0.35)}
    write_seeds(tmp_path, {k: seed_results(k, *g) for k, g in gains.items()})
    paths = write_report(tmp_path)
    report = json.loads(paths["results"].read_text())
    by_q = {c["question"]: c for c in report["comparisons"]}
    ondare = by_q["dpo-ondare vs dpo-adamw: reward at matched benchmark average"]
    # Over the shared averages [30, 40]: ondare's sweep is above by `gain` except near its SFT end,
    # where both sweeps start at the same SFT point: (SFT, 0) -> (37.5, 0.75 + g) for ondare.
    per_seed = []
    for k, (g, _, _) in gains.items():
        xs = [30 + 10 * i / 20 for i in range(21)]

        def a(x, g=g):
            return 3 - 0.3 * (x - 30) + g if x <= 37.5 else (40 - x) / 2.5 * (0.75 + g) + 0.05 * k - 0.05 * k

        def b(x):
            return 3 - 0.3 * (x - 30)

        per_seed.append(statistics.mean(a(x) - b(x) for x in xs))
    assert ondare["difference"]["estimate"] == pytest.approx(statistics.mean(per_seed))
    assert ondare["verdict"] == "better" and ondare["n"] == 3
    assert ondare["p_value"] == pytest.approx(sp.ttest_1samp(per_seed, 0.0).pvalue)
    onties = by_q["dpo-onties vs dpo-adamw: reward at matched benchmark average"]
    assert onties["verdict"] == "no detectable difference"
    tax = by_q["dpo-ondare vs dpo-adamw: tax (pp) at matched reward"]
    assert tax["verdict"] == "better" and tax["difference"]["estimate"] < 0  # less tax for the same reward
    ama = by_q["ama/dpo-adamw vs the averaging sweep of dpo-adamw: reward above the sweep at its tax"]
    assert ama["difference"]["estimate"] == pytest.approx(statistics.mean(g[2] for g in gains.values()))
    assert ama["verdict"] == "better"
    md = paths["report"].read_text()
    assert "## Comparisons" in md and "| dpo-ondare vs dpo-adamw: reward at matched benchmark average | +" in md
    assert "mean over 3 seeds" in md and " ±" in md
    assert paths["pareto"].is_file() and paths["pareto"].stat().st_size > 10_000


def test_one_seed_gets_bootstrap_intervals_over_prompts_and_no_verdicts(tmp_path):
    res = seed_results(0, 0.5, 0.0, 0.3)
    d = tmp_path / "evaluate"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(res))
    rewards = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.5]  # mean 3.6875
    (d / "align" / "dpo-ondare").mkdir(parents=True)
    (d / "align" / "dpo-ondare" / "responses.jsonl").write_text(
        "".join(json.dumps({"prompt": "p", "response": "r", "reward": x}) + "\n" for x in rewards))
    report = gather(tmp_path)
    row = next(r for r in report["models"] if r["id"] == "align/dpo-ondare")
    iv = row["intervals"]["reward"]
    assert iv["kind"] == "bootstrap" and iv["n"] == len(rewards)
    assert iv["low"] < statistics.mean(rewards) < iv["high"]
    assert row["reward"] == pytest.approx(3.5)  # the number stays the run's own mean (results.json's)
    assert all(c["verdict"] == "no detectable difference" and c["n"] == 1 for c in report["comparisons"])
    assert report["seeds"] == [0]


def test_a_missing_seed_is_one_error(tmp_path):
    from taxfree.errors import TaxfreeError

    write_seeds(tmp_path, {0: seed_results(0, 0.5, 0, 0.3)})
    with pytest.raises(TaxfreeError, match=r"no evaluation results for seed 1 \(seed1/evaluate/results.json is missing\)"):
        gather(tmp_path, seeds=[0, 1])
