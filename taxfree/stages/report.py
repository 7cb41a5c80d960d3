"""`report`: the run's results table and reward-vs-tax plot from the evaluate stage's results.

Writes `runs/<name>/report.md`, `runs/<name>/results.json` (every number, tax included) and
`runs/<name>/pareto.png`; the maths and drawing live in `taxfree.eval.report`, which
`taxfree report RUN_DIR` calls directly on any run directory. `report.reward_axis` puts a judge
metric (mt_bench, alpaca_eval_lc, alpaca_eval_wr) on the plot's y axis instead of the reward.
"""

from __future__ import annotations

import dataclasses

from taxfree.errors import TaxfreeError
from taxfree.eval.report import EVAL_RESULTS, write_report


def inputs(cfg) -> dict:
    return {"evaluation": ("evaluate", str(cfg.root / EVAL_RESULTS))}


def preflight(cfg) -> None:
    """A judge metric on the plot needs the judge to measure it."""
    axis = cfg.report.reward_axis
    if axis == "reward":
        return
    benchmark = "mt_bench" if axis == "mt_bench" else "alpaca_eval"
    judge = cfg.evaluate.judge
    if judge is None or benchmark not in judge.benchmarks:
        raise TaxfreeError(f"{cfg.source}: report.reward_axis: {axis} needs evaluate.judge with {benchmark} "
                           "in its benchmarks")


def section(cfg) -> dict:
    return {"report": dataclasses.asdict(cfg.report)}


def run(ctx) -> dict:
    cfg = ctx.cfg
    paths = write_report(cfg.root, title=cfg.report.title, dpi=cfg.report.dpi, reward_axis=cfg.report.reward_axis)
    return {"files": len(paths), **{k: str(v) for k, v in paths.items()}}
