"""Named benchmark suites: which tasks measure the alignment tax for each preset, as data.

Each entry names the runner (lm-eval or OpenCompass), the task, the one metric that counts for
the suite average, and the factor that puts that metric in percent (lm-eval reports accuracy in
[0, 1] but BLEU and SQuAD-v2 F1 in [0, 100]; OpenCompass reports percent). The alignment tax is
the drop of `suite_average` relative to the SFT model.

Task names and metric keys were checked against lm-eval 0.4.13's task YAMLs
(`lm_eval/tasks/...`) and the opencompass 0.5.4 wheel; metric keys are in `run_lm_eval`'s
flattened form (`"acc"`, `"exact_match,flexible-extract"`, ...). Few-shot counts are the
tasks' own defaults unless given here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from taxfree.errors import TaxfreeError, nearest


@dataclass(frozen=True)
class BenchmarkTask:
    """One benchmark in a suite and the number of it that counts."""

    task: str
    metric: str
    runner: Literal["lm_eval", "opencompass"] = "lm_eval"
    to_percent: float = 100.0
    num_fewshot: int | None = None
    executes_code: bool = False
    note: str = ""


@dataclass(frozen=True)
class BenchmarkSuite:
    name: str
    description: str
    tasks: tuple[BenchmarkTask, ...]

    def lm_eval_tasks(self) -> list[BenchmarkTask]:
        return [t for t in self.tasks if t.runner == "lm_eval"]

    def opencompass_tasks(self) -> list[BenchmarkTask]:
        return [t for t in self.tasks if t.runner == "opencompass"]


SUITES: dict[str, BenchmarkSuite] = {
    suite.name: suite
    for suite in (
        BenchmarkSuite(
            name="ama_paper",
            description=(
                "Alignment-tax benchmarks of 'Mitigating the Alignment Tax of RLHF' (arXiv 2309.06256): "
                "common sense QA, reading comprehension, translation"
            ),
            tasks=(
                BenchmarkTask("arc_easy", "acc"),
                BenchmarkTask("arc_challenge", "acc"),
                BenchmarkTask("race", "acc"),
                BenchmarkTask("piqa", "acc"),
                BenchmarkTask("squadv2", "f1", to_percent=1.0, note="SQuAD 2.0; F1 already in percent"),
                BenchmarkTask("drop", "f1"),
                BenchmarkTask("wmt14-fr-en", "bleu", to_percent=1.0, note="sacreBLEU, 0-100"),
            ),
        ),
        BenchmarkSuite(
            name="online_merging_paper",
            description=(
                "Benchmarks of 'Online Merging Optimizers for Boosting Rewards and Mitigating Tax in "
                "Alignment' (arXiv 2405.17931) that lm-eval has"
            ),
            tasks=(
                BenchmarkTask("gsm8k", "exact_match,flexible-extract"),
                BenchmarkTask("mmlu", "acc", note="group average over the 57 subjects"),
                BenchmarkTask("ifeval", "prompt_level_strict_acc"),
                BenchmarkTask("humaneval", "pass_at_k,create_test", executes_code=True, note="pass@1"),
                BenchmarkTask("mbpp", "pass_at_1", executes_code=True),
                BenchmarkTask("coqa", "f1"),
                BenchmarkTask("drop", "f1"),
            ),
        ),
        BenchmarkSuite(
            name="online_merging_paper_opencompass",
            description="Benchmarks of the online merging paper that only OpenCompass has",
            tasks=(
                BenchmarkTask("math401", "accuracy", runner="opencompass", to_percent=1.0),
                BenchmarkTask("ds1000", "accuracy", runner="opencompass", to_percent=1.0, executes_code=True,
                              note="mean over the DS-1000 libraries' rows (ds1000_<Lib>)"),
            ),
        ),
    )
}


def get_suite(name: str) -> BenchmarkSuite:
    if name not in SUITES:
        hint = nearest(name, SUITES) or f" (known: {', '.join(sorted(SUITES))})"
        raise TaxfreeError(f"unknown benchmark suite {name!r}{hint}")
    return SUITES[name]


def task_score(task: BenchmarkTask, results: dict[str, dict[str, float]]) -> float:
    """The counted metric of `task` in percent, from `{task/dataset: {metric: value}}` results.

    An OpenCompass dataset that reports per sub-dataset (`ds1000_Pandas`, ...) counts as the
    mean of its sub-datasets.
    """
    rows = {task.task: results[task.task]} if task.task in results else {
        k: v for k, v in results.items() if k.startswith(task.task + "_")
    }
    if not rows:
        raise TaxfreeError(f"no result for benchmark {task.task}")
    values = []
    for name, metrics in rows.items():
        if task.metric not in metrics or metrics[task.metric] is None:
            known = ", ".join(sorted(metrics)) or "none"
            raise TaxfreeError(f"benchmark {name}: no metric {task.metric!r} (has: {known})")
        values.append(float(metrics[task.metric]) * task.to_percent)
    return sum(values) / len(values)


def suite_scores(suite: BenchmarkSuite, results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: score in percent} for every task of the suite."""
    return {t.task: task_score(t, results) for t in suite.tasks}


def suite_average(suite: BenchmarkSuite, results: dict[str, dict[str, float]]) -> float:
    """Unweighted mean over the suite's tasks of their counted metric, in percent."""
    scores = suite_scores(suite, results)
    return sum(scores.values()) / len(scores)
