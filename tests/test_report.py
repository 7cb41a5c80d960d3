"""Tax arithmetic, report table, results.json, Pareto plot and `taxfree report RUN_DIR`, from hand-made results."""

import json

import pytest

from taxfree.cli import main
from taxfree.errors import TaxfreeError
from taxfree.eval.report import alignment_tax, build_report, render_markdown, write_report


def _row(mid, kind, reward, gold, know, arith, aligned=None, weight=None, win=None):
    return {"id": mid, "kind": kind, "path": f"/m/{mid}", "aligned": aligned, "aligned_weight": weight,
            "reward": reward, "gold_reward": gold, "pairrm_win_rate": win,
            "benchmarks": {"tiny_knowledge": {"acc": know / 100}, "tiny_arithmetic": {"acc": arith / 100}},
            "scores": {"tiny_knowledge": know, "tiny_arithmetic": arith}}


def _results():
    return {
        "experiment": "synthetic",
        "baseline": "sft",
        "reward_model": "runs/synthetic/rm/model",
        "pairrm": "pairrm-dir",
        "generation": {"do_sample": False, "max_new_tokens": 32, "prompts": 8},
        "benchmarks": [{"task": "tiny_knowledge", "metric": "acc"}, {"task": "tiny_arithmetic", "metric": "acc"}],
        "models": [
            _row("sft", "sft", 0.10, 0.5, 60.0, 40.0, weight=0.0, win=0.5),
            _row("align/dpo-adamw", "align", 0.90, 2.0, 50.0, 30.0, aligned="dpo-adamw", weight=1.0, win=0.8),
            _row("align/dpo-ondare", "align", 0.85, 1.9, 58.0, 38.0, aligned="dpo-ondare", weight=1.0, win=0.75),
            _row("merge/dpo-adamw-w0.5", "merge", 0.60, 1.2, 57.0, 39.0, aligned="dpo-adamw", weight=0.5, win=0.7),
            _row("ama", "ama", 0.70, 1.5, 59.0, 40.0, aligned="dpo-adamw", win=0.72),
        ],
    }


def _run_dir(tmp_path, results=None):
    d = tmp_path / "runs" / "synthetic"
    (d / "evaluate").mkdir(parents=True)
    (d / "evaluate" / "results.json").write_text(json.dumps(results or _results()))
    return d


def test_alignment_tax_by_hand():
    per, avg = alignment_tax({"a": 60.0, "b": 40.0}, {"a": 50.0, "b": 45.0})
    assert per == {"a": 10.0, "b": -5.0}  # lost 10 points on a, gained 5 on b
    assert avg == pytest.approx(2.5)  # (60+40)/2 - (50+45)/2
    assert alignment_tax({"a": 60.0}, {"a": 60.0}) == ({"a": 0.0}, 0.0)
    assert alignment_tax({}, {}) == ({}, None)
    with pytest.raises(TaxfreeError, match="different benchmarks"):
        alignment_tax({"a": 1.0}, {"b": 1.0})


def test_build_report_adds_tax_against_sft():
    report = build_report(_results())
    rows = {r["id"]: r for r in report["models"]}
    assert rows["sft"]["tax_average"] == 0.0 and rows["sft"]["tax"] == {"tiny_knowledge": 0.0, "tiny_arithmetic": 0.0}
    assert rows["align/dpo-adamw"]["benchmark_average"] == pytest.approx(40.0)
    assert rows["align/dpo-adamw"]["tax_average"] == pytest.approx(10.0)  # 50 - 40
    assert rows["align/dpo-adamw"]["tax"]["tiny_knowledge"] == pytest.approx(10.0)
    assert rows["ama"]["tax_average"] == pytest.approx(0.5)  # 50 - 49.5
    bad = _results()
    bad["models"] = bad["models"][1:]
    with pytest.raises(TaxfreeError, match="baseline model 'sft' is missing"):
        build_report(bad)


def test_markdown_table_has_every_column_and_row():
    md = render_markdown(build_report(_results()), "synthetic: reward vs alignment tax")
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    for col in ("reward (RM)", "gold reward", "PairRM win rate vs SFT", "tiny_knowledge (%)", "tiny_arithmetic (%)",
                "average (%)", "tax (pp)"):
        assert col in header
    dpo = next(line for line in lines if line.startswith("| `align/dpo-adamw`"))
    cells = [c.strip() for c in dpo.strip("|").split("|")]
    assert cells == ["`align/dpo-adamw`", "0.900", "2.000", "0.800", "50.0", "30.0", "40.0", "10.0"]
    assert sum(line.startswith("| `") for line in lines) == 5
    # A column nobody measured is left out, and the notes say why.
    res = _results()
    for r in res["models"]:
        r["pairrm_win_rate"] = None
    md = render_markdown(build_report(res), "t")
    assert "PairRM win rate vs SFT" not in md and "not measured" in md


def test_write_report_files_and_cli(tmp_path, capsys):
    d = _run_dir(tmp_path)
    assert main(["report", str(d)]) == 0
    out = capsys.readouterr().out
    assert str(d / "report.md") in out
    png = (d / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((d / "results.json").read_text())
    rows = {r["id"]: r for r in saved["models"]}
    assert rows["merge/dpo-adamw-w0.5"]["tax_average"] == pytest.approx(2.0)  # 50 - 48
    assert rows["sft"]["reward"] == 0.10 and rows["ama"]["pairrm_win_rate"] == 0.72
    md = (d / "report.md").read_text()
    assert md.startswith("# synthetic: reward vs alignment tax") and "![reward vs alignment tax](pareto.png)" in md
    assert not list(d.glob(".tmp-*"))


def test_report_without_benchmarks_has_no_plot(tmp_path):
    res = _results()
    for r in res["models"]:
        r["scores"], r["benchmarks"] = {}, {}
    d = _run_dir(tmp_path, res)
    paths = write_report(d)
    assert "pareto" not in paths and not (d / "pareto.png").exists()
    assert "no tax column" in (d / "report.md").read_text()


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    empty = tmp_path / "runs" / "nothing"
    empty.mkdir(parents=True)
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no evaluation results" in err[0]
    d = _run_dir(tmp_path)
    (d / "evaluate" / "results.json").write_text("{not json")
    assert main(["report", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable evaluation results" in err[0]
    assert main(["report", str(d), "--set", "report.dpi=100"]) == 2
    assert "--set applies to a config" in capsys.readouterr().err
