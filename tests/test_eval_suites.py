"""Benchmark suites: real task names, and the average that defines the alignment tax."""

import re
from pathlib import Path

import pytest

from taxfree.errors import TaxfreeError
from taxfree.eval.opencompass import OPENCOMPASS_DATASETS
from taxfree.eval.suites import SUITES, get_suite, suite_average, suite_scores


def installed_lm_eval_names() -> set[str]:
    """Every `task:` / `group:` name declared in the installed lm-eval's task YAMLs."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    pattern = re.compile(r"^(?:task|group): *([^\s#]+)", re.M)
    names = set()
    for path in root.rglob("*.yaml"):
        names.update(pattern.findall(path.read_text(encoding="utf-8", errors="replace")))
    return names


def test_every_lm_eval_task_exists_in_the_installed_harness():
    names = installed_lm_eval_names()
    wanted = {t.task for s in SUITES.values() for t in s.lm_eval_tasks()}
    assert wanted and wanted <= names, sorted(wanted - names)


def test_every_opencompass_task_has_a_dataset_config():
    wanted = {t.task for s in SUITES.values() for t in s.opencompass_tasks()}
    assert wanted and wanted <= set(OPENCOMPASS_DATASETS)


def test_code_tasks_are_marked():
    om = get_suite("online_merging_paper")
    assert {t.task for t in om.tasks if t.executes_code} == {"humaneval", "mbpp"}


def test_average_puts_every_metric_in_percent():
    ama = get_suite("ama_paper")
    results = {
        "arc_easy": {"acc": 0.5, "acc_norm": 0.9},
        "arc_challenge": {"acc": 0.25},
        "race": {"acc": 0.4},
        "piqa": {"acc": 0.7},
        "squadv2": {"f1": 60.0, "exact": 50.0},
        "drop": {"f1": 0.3, "em": 0.2},
        "wmt14-fr-en": {"bleu": 20.0, "chrf": 45.0},
    }
    scores = suite_scores(ama, results)
    assert scores == pytest.approx({"arc_easy": 50.0, "arc_challenge": 25.0, "race": 40.0, "piqa": 70.0,
                                    "squadv2": 60.0, "drop": 30.0, "wmt14-fr-en": 20.0})
    assert suite_average(ama, results) == pytest.approx(295.0 / 7)


def test_opencompass_subdatasets_average_into_their_benchmark():
    oc = get_suite("online_merging_paper_opencompass")
    results = {"math401": {"accuracy": 40.0}, "ds1000_Pandas": {"accuracy": 10.0}, "ds1000_Numpy": {"accuracy": 30.0}}
    assert suite_scores(oc, results) == {"math401": 40.0, "ds1000": 20.0}


def test_missing_results_are_errors():
    ama = get_suite("ama_paper")
    with pytest.raises(TaxfreeError, match="no result for benchmark arc_easy"):
        suite_average(ama, {})
    with pytest.raises(TaxfreeError, match=r"benchmark arc_easy: no metric 'acc' \(has: acc_norm\)"):
        suite_scores(ama, {"arc_easy": {"acc_norm": 0.5}})
    with pytest.raises(TaxfreeError, match="did you mean ama_paper"):
        get_suite("ama_papr")
