"""How sure a number is: intervals over seeds or over evaluation items, paired comparisons, and
comparisons of reward at matched tax along averaging sweeps.

With several seeds a metric's interval is Student's t interval of its per-seed values; with one
seed it is a percentile bootstrap over the evaluation items (held-out prompts, benchmark items),
so a single run still says how many items a difference is worth. A comparison of two models (or
two variants) is paired: across seeds when there are several (the same seed shares data order
and upstream models), else across items. Its verdict is "better" / "worse" when the 95% interval
of the difference excludes zero, else "no detectable difference".
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval; `n` values behind it, `kind` how it was made."""

    estimate: float
    low: float
    high: float
    n: int
    kind: str  # "t" (over seeds), "bootstrap" (over items), "none" (a single value)

    def to_dict(self) -> dict:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """mean +- t_{dof} * sd / sqrt(n) over independent values (seeds); one value: no interval."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("t_interval: no values")
    m = _mean(values)
    if n == 1:
        return Interval(m, m, m, 1, "none")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, n, "t")


def bootstrap_interval(items: Sequence[float], confidence: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0, statistic: Callable[[Sequence[float]], float] = _mean) -> Interval:
    """Percentile bootstrap of `statistic` (the mean) over items drawn with replacement; the same
    `seed` gives the same interval."""
    items = [float(v) for v in items]
    n = len(items)
    if n == 0:
        raise ValueError("bootstrap_interval: no items")
    est = statistic(items)
    if n == 1:
        return Interval(est, est, est, 1, "none")
    rng = random.Random(seed)
    stats = sorted(statistic([items[rng.randrange(n)] for _ in range(n)]) for _ in range(samples))
    lo_i = int(math.floor((1 - confidence) / 2 * samples))
    hi_i = int(math.ceil((1 + confidence) / 2 * samples)) - 1
    return Interval(est, stats[lo_i], stats[min(hi_i, samples - 1)], n, "bootstrap")


def metric_interval(per_seed: Sequence[float], per_item: Sequence[float] | None = None, seed: int = 0) -> Interval:
    """A reported number's interval: over seeds when there are several, else over its items."""
    if len(per_seed) >= 2 or not per_item:
        return t_interval(per_seed)
    return bootstrap_interval(per_item, seed=seed)


@dataclass(frozen=True)
class Comparison:
    """`a - b` with its interval, the p-value of a paired two-sided test where one applies, and
    the plain verdict the report prints."""

    question: str
    difference: Interval
    p_value: float | None
    verdict: str

    def to_dict(self) -> dict:
        return {"question": self.question, "difference": self.difference.to_dict(), "p_value": self.p_value,
                "verdict": self.verdict}


def verdict(diff: Interval, higher_is_better: bool = True) -> str:
    if diff.n < 2 or not diff.excludes_zero():
        return "no detectable difference"
    return "better" if (diff.estimate > 0) == higher_is_better else "worse"


def paired_comparison(question: str, a: Sequence[float], b: Sequence[float], higher_is_better: bool = True,
                      seed: int = 0) -> Comparison:
    """Paired a - b: Student's t over the pairs (seeds). With fewer than 2 pairs nothing can be
    said; use `paired_item_comparison` on one seed's items instead."""
    if len(a) != len(b):
        raise ValueError(f"paired_comparison: {len(a)} values against {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    interval = t_interval(diffs)
    p = None
    if len(diffs) >= 2:
        sd = math.sqrt(sum((d - interval.estimate) ** 2 for d in diffs) / (len(diffs) - 1))
        if sd == 0:
            p = 0.0 if interval.estimate != 0 else 1.0
        else:
            from scipy.stats import t

            stat = interval.estimate / (sd / math.sqrt(len(diffs)))
            p = float(2 * t.sf(abs(stat), len(diffs) - 1))
    return Comparison(question, interval, p, verdict(interval, higher_is_better))


def paired_item_comparison(question: str, a_items: Sequence[float], b_items: Sequence[float],
                           higher_is_better: bool = True, seed: int = 0) -> Comparison:
    """Paired a - b over the same evaluation items of one run (a bootstrap of the item differences)."""
    if len(a_items) != len(b_items):
        raise ValueError(f"paired_item_comparison: {len(a_items)} items against {len(b_items)}")
    interval = bootstrap_interval([float(x) - float(y) for x, y in zip(a_items, b_items)], seed=seed)
    return Comparison(question, interval, None, verdict(interval, higher_is_better))


# -- sweeps: reward at matched tax ---------------------------------------------------------------

def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through `points` (x, y) sorted by x; None outside
    their x range. Equal x values are averaged first."""
    by_x: dict[float, list[float]] = {}
    for px, py in points:
        by_x.setdefault(float(px), []).append(float(py))
    xs = sorted(by_x)
    ys = [_mean(by_x[v]) for v in xs]
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0]  # a single point, x equal to it


def matched_difference(curve_a: Sequence[tuple[float, float]], curve_b: Sequence[tuple[float, float]],
                       grid: int = 21) -> float | None:
    """Mean over the common x range of curve_a(x) - curve_b(x), e.g. reward difference at matched
    benchmark average between two sweeps; None when the ranges do not overlap."""
    lo = max(min(p[0] for p in curve_a), min(p[0] for p in curve_b))
    hi = min(max(p[0] for p in curve_a), max(p[0] for p in curve_b))
    if lo > hi:
        return None
    xs = [lo] if hi == lo else [lo + (hi - lo) * i / (grid - 1) for i in range(grid)]
    return _mean([interpolate(curve_a, x) - interpolate(curve_b, x) for x in xs])


def above_curve(curve: Sequence[tuple[float, float]], point: tuple[float, float]) -> float | None:
    """How far `point` (x, y) lies above the curve at its x (y - curve(x)); None outside its range."""
    at = interpolate(curve, point[0])
    return None if at is None else float(point[1]) - at
