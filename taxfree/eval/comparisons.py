"""The papers' questions, asked of a run's results: is one optimizer (or method) better than
another at the same tax, and do AMA and partwise merging lie above the averaging sweep?

Every align variant has a sweep: the SFT model (aligned weight 0), its merge points by aligned
weight, and the aligned model (weight 1), each a point (benchmark average, reward). Two variants
are compared by the mean difference of their sweeps over the benchmark averages both reach
(reward at matched tax), and by the mean difference of their tax over the rewards both reach (tax
at matched reward); a single model (AMA, a partwise point) by its height above its own
variant's sweep at its benchmark average. Each difference is computed per seed and the seeds'
values are tested as pairs (taxfree.eval.stats): with one seed nothing is claimed.
"""

from __future__ import annotations

from typing import Callable

from taxfree.eval.stats import Comparison, above_curve, matched_difference, paired_comparison

BASELINE_OPTIMIZER = "adamw"
BASELINE_METHOD = "dpo"


def variant_of(row: dict) -> str | None:
    """The align variant a model belongs to: itself for an aligned model, its source otherwise."""
    if row.get("kind") == "align":
        return row["id"].split("/", 1)[-1]
    return row.get("aligned")


def sweep(rows: list[dict], variant: str, baseline: str = "sft") -> list[dict]:
    """SFT, the variant's linear merge points (by aligned weight) and the aligned model."""
    base = [r for r in rows if r["id"] == baseline]
    merges = sorted((r for r in rows if r.get("kind") == "merge" and r.get("aligned") == variant
                     and r.get("aligned_weight") is not None), key=lambda r: r["aligned_weight"])
    aligned = [r for r in rows if r.get("kind") == "align" and variant_of(r) == variant]
    return base + merges + aligned


def curve(points: list[dict], x: str, y: str) -> list[tuple[float, float]]:
    return [(r[x], r[y]) for r in points if r.get(x) is not None and r.get(y) is not None]


def _split(variant: str) -> tuple[str, str]:
    """dpo-adamw -> (dpo, adamw); exo-pref-onties -> (exo-pref, onties)."""
    method, _, optimizer = variant.rpartition("-")
    return method, optimizer


def _pairs(variants: list[str]) -> list[tuple[str, str, str]]:
    """(kind, a, b) of the comparisons the papers make: each optimizer against AdamW within a
    method, each method against DPO under the same optimizer."""
    present = set(variants)
    out = []
    for v in variants:
        method, optimizer = _split(v)
        if optimizer != BASELINE_OPTIMIZER and f"{method}-{BASELINE_OPTIMIZER}" in present:
            out.append(("optimizer", v, f"{method}-{BASELINE_OPTIMIZER}"))
    for v in variants:
        method, optimizer = _split(v)
        if method != BASELINE_METHOD and f"{BASELINE_METHOD}-{optimizer}" in present:
            out.append(("method", v, f"{BASELINE_METHOD}-{optimizer}"))
    return out


def _per_seed(reports: dict[int, dict], fn: Callable[[list[dict]], float | None]) -> list[float]:
    values = [fn(r["models"]) for r in reports.values()]
    return [v for v in values if v is not None]


def compare(reports: dict[int, dict], reward: str = "reward", baseline: str = "sft") -> list[dict]:
    """Every comparison the run's models allow, one report (build_report) per seed: the question,
    the estimate with its 95% interval over seeds, n, the p-value and a plain verdict."""
    first = next(iter(reports.values()))["models"]
    variants = sorted({v for r in first if r.get("kind") == "align" and (v := variant_of(r))})
    out: list[Comparison] = []

    def matched(a: str, b: str, x: str, y: str) -> Callable[[list[dict]], float | None]:
        return lambda rows: matched_difference(curve(sweep(rows, a, baseline), x, y), curve(sweep(rows, b, baseline), x, y)) \
            if len(curve(sweep(rows, a, baseline), x, y)) >= 2 and len(curve(sweep(rows, b, baseline), x, y)) >= 2 else None

    for kind, a, b in _pairs(variants):
        d = _per_seed(reports, matched(a, b, "benchmark_average", reward))
        if d:
            out.append(paired_comparison(f"{a} vs {b}: {reward} at matched benchmark average", d, [0.0] * len(d)))
        d = _per_seed(reports, matched(a, b, reward, "tax_average"))
        if d:
            out.append(paired_comparison(f"{a} vs {b}: tax (pp) at matched {reward}", d, [0.0] * len(d),
                                         higher_is_better=False))
    singles = [r for r in first if r.get("kind") == "ama" or (r.get("kind") == "merge" and r.get("aligned_weight") is None)]
    for row in singles:
        v = variant_of(row)
        if v is None:
            continue

        def height(rows, mid=row["id"], v=v):
            point = next((r for r in rows if r["id"] == mid), None)
            if point is None or point.get("benchmark_average") is None or point.get(reward) is None:
                return None
            line = curve(sweep(rows, v, baseline), "benchmark_average", reward)
            return above_curve(line, (point["benchmark_average"], point[reward])) if len(line) >= 2 else None

        d = _per_seed(reports, height)
        if d:
            out.append(paired_comparison(f"{row['id']} vs the averaging sweep of {v}: {reward} above the sweep at its tax",
                                         d, [0.0] * len(d)))
    return [c.to_dict() | {"n": c.difference.n} for c in out]
