"""`report`: the run's results table and reward-vs-tax plot from the evaluate stage's results.

Writes `runs/<name>/report.md`, `runs/<name>/results.json` (every number, tax included) and
`runs/<name>/pareto.png`; the maths and drawing live in `taxfree.eval.report`, which
`taxfree report RUN_DIR` calls directly on any run directory.
"""

from __future__ import annotations

import dataclasses

from taxfree.eval.report import EVAL_RESULTS, write_report


def inputs(cfg) -> dict:
    return {"evaluation": ("evaluate", str(cfg.root / EVAL_RESULTS))}


def section(cfg) -> dict:
    return {"report": dataclasses.asdict(cfg.report)}


def run(ctx) -> dict:
    cfg = ctx.cfg
    paths = write_report(cfg.root, title=cfg.report.title, dpi=cfg.report.dpi)
    return {"files": len(paths), **{k: str(v) for k, v in paths.items()}}
