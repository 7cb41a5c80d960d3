"""`report`: the run's results table and reward-vs-tax plot from the evaluate stage's results.

Writes `runs/<name>/report.md`, `runs/<name>/results.json` (every number, tax included) and
`runs/<name>/pareto.png`; the maths and drawing live in `taxfree.eval.report`, which
`taxfree report RUN_DIR` calls directly on any run directory. `report.reward_axis` puts a judge
metric (mt_bench, alpaca_eval_lc, alpaca_eval_wr) on the plot's y axis instead of the reward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from taxfree.errors import ConfigError
from taxfree.eval.report import write_report
from taxfree.pipeline.schema import require
from taxfree.pipeline.stages import Stage


@dataclass
class ReportStageConfig:
    """The results table and the reward-vs-tax plot of the run (report.md, results.json, pareto.png)."""

    title: str | None = None  # null = "<name>: reward vs alignment tax"
    dpi: int = 150
    reward_axis: Literal["reward", "mt_bench", "alpaca_eval_lc", "alpaca_eval_wr"] = "reward"  # the plot's y axis

    def check(self):
        require(30 <= self.dpi <= 600, "dpi", "must be in [30, 600]")


def inputs(cfg) -> dict:
    return {"evaluation": ("evaluate", str(cfg.stage_dir("evaluate") / "results.json"))}


def check(cfg) -> None:
    """A judge metric on the plot needs the judge to measure it."""
    axis = cfg.report.reward_axis
    if axis == "reward":
        return
    benchmark = "mt_bench" if axis == "mt_bench" else "alpaca_eval"
    judge = cfg.evaluate.judge
    if judge is None or benchmark not in judge.benchmarks:
        raise ConfigError(f"{cfg.source}: report.reward_axis: {axis} needs evaluate.judge with {benchmark} "
                           "in its benchmarks")


def section(cfg) -> dict:
    return {"report": dataclasses.asdict(cfg.report)}


def run(ctx) -> dict:
    cfg = ctx.cfg
    paths = write_report(cfg.root, title=cfg.report.title, dpi=cfg.report.dpi, reward_axis=cfg.report.reward_axis,
                         seeds=cfg.seeds)
    return {"files": len(paths), **{k: str(v) for k, v in paths.items()}}


STAGE = Stage(
    name="report",
    help="results table and reward-vs-tax plot (CONFIG, or a run directory: taxfree report RUN_DIR)",
    config=ReportStageConfig,
    inputs=inputs,
    section=section,
    run=run,
    check=check,
    across_seeds=True,
)

