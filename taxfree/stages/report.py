"""`report`: the run's results table and reward-vs-tax plot from the evaluate stage's results.

Writes `runs/<name>/report.md`, `runs/<name>/results.json` (every number, tax included) and
`runs/<name>/pareto.png`; the maths and drawing live in `taxfree.eval.report`, which
`taxfree report RUN_DIR` calls directly on any run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from taxfree.eval.report import EVAL_RESULTS, write_report
from taxfree.pipeline.schema import require
from taxfree.pipeline.stages import Stage


@dataclass
class ReportStageConfig:
    """The results table and the reward-vs-tax plot of the run (report.md, results.json, pareto.png)."""

    title: str | None = None  # null = "<name>: reward vs alignment tax"
    dpi: int = 150

    def check(self):
        require(30 <= self.dpi <= 600, "dpi", "must be in [30, 600]")


def inputs(cfg) -> dict:
    return {"evaluation": ("evaluate", str(cfg.root / EVAL_RESULTS))}


def section(cfg) -> dict:
    return {"report": dataclasses.asdict(cfg.report)}


def run(ctx) -> dict:
    cfg = ctx.cfg
    paths = write_report(cfg.root, title=cfg.report.title, dpi=cfg.report.dpi)
    return {"files": len(paths), **{k: str(v) for k, v in paths.items()}}


STAGE = Stage(
    name="report",
    help="results table and reward-vs-tax plot (CONFIG, or a run directory: taxfree report RUN_DIR)",
    config=ReportStageConfig,
    inputs=inputs,
    section=section,
    run=run,
    across_seeds=True,
)

