"""Intervals, paired tests and matched-tax comparisons against hand computation and scipy."""

import math
import statistics

import pytest
from scipy import stats as sp

from taxfree.eval.stats import (
    above_curve,
    bootstrap_interval,
    interpolate,
    matched_difference,
    metric_interval,
    paired_comparison,
    paired_item_comparison,
    t_interval,
)


def test_t_interval_by_hand_and_against_scipy():
    values = [1.0, 2.0, 4.0]
    got = t_interval(values)
    m, sd = 7 / 3, statistics.stdev(values)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert (got.estimate, got.low, got.high, got.n, got.kind) == pytest.approx((m, m - half, m + half, 3, "t"))
    low, high = sp.t.interval(0.95, 2, loc=m, scale=sp.sem(values))
    assert got.low == pytest.approx(low) and got.high == pytest.approx(high)
    one = t_interval([5.0])
    assert (one.low, one.high, one.kind) == (5.0, 5.0, "none")


def test_bootstrap_is_seeded_brackets_the_mean_and_narrows_with_items():
    items = [float(i % 7) for i in range(50)]
    a, b = bootstrap_interval(items, seed=3), bootstrap_interval(items, seed=3)
    assert a == b and a.kind == "bootstrap" and a.n == 50
    assert a.low < statistics.mean(items) < a.high
    wide = bootstrap_interval(items[:10], seed=3)
    assert (wide.high - wide.low) > (a.high - a.low)
    # For a mean the percentile bootstrap is close to the normal interval mean +- 1.96 * sd / sqrt(n).
    half = 1.96 * statistics.pstdev(items) / math.sqrt(len(items))
    assert (a.high - a.low) / 2 == pytest.approx(half, rel=0.15)
    constant = bootstrap_interval([2.0] * 8)
    assert (constant.low, constant.high) == (2.0, 2.0)


def test_metric_interval_uses_seeds_when_there_are_several_else_items():
    assert metric_interval([1.0, 2.0, 3.0], per_item=[0.0, 10.0]).kind == "t"
    one = metric_interval([0.5], per_item=[0.0, 1.0, 1.0, 0.0])
    assert one.kind == "bootstrap" and one.estimate == 0.5


def test_paired_test_on_data_with_a_known_answer():
    base = [10.0, 20.0, 30.0, 40.0]
    better = [b + d for b, d in zip(base, [1.0, 1.2, 0.8, 1.1])]  # a consistent +1, large seed-to-seed spread
    c = paired_comparison("A vs B", better, base)
    assert c.verdict == "better" and c.difference.estimate == pytest.approx(1.025)
    assert c.p_value == pytest.approx(sp.ttest_rel(better, base).pvalue)
    # Unpaired, the same numbers would be lost in the seed-to-seed spread.
    assert sp.ttest_ind(better, base).pvalue > 0.5
    assert paired_comparison("B vs A", base, better).verdict == "worse"
    assert paired_comparison("tax", better, base, higher_is_better=False).verdict == "worse"
    noise = paired_comparison("noise", [1.0, 2.0, 3.0], [1.5, 1.5, 3.1])
    assert noise.verdict == "no detectable difference" and noise.difference.low < 0 < noise.difference.high
    single = paired_comparison("one seed", [2.0], [1.0])
    assert single.verdict == "no detectable difference" and single.p_value is None


def test_paired_item_comparison_over_one_runs_items():
    a = [1.0] * 30 + [0.0] * 10
    b = [0.0] * 40
    assert paired_item_comparison("a vs b", a, b).verdict == "better"
    assert paired_item_comparison("same", a, list(a)).verdict == "no detectable difference"


def test_interpolation_along_a_sweep_by_hand():
    sweep = [(30.0, 0.5), (20.0, 2.0), (25.0, 1.0)]  # (benchmark average, reward), unsorted
    assert interpolate(sweep, 27.5) == pytest.approx(0.75)
    assert interpolate(sweep, 22.0) == pytest.approx(1.0 + (2.0 - 1.0) * (22 - 25) / (20 - 25))
    assert interpolate(sweep, 31.0) is None and interpolate(sweep, 30.0) == pytest.approx(0.5)
    assert interpolate([(1.0, 2.0), (1.0, 4.0)], 1.0) == pytest.approx(3.0)  # equal x: averaged


def test_matched_difference_and_above_curve_by_hand():
    a = [(20.0, 3.0), (30.0, 1.0)]
    b = [(22.0, 2.5), (32.0, 0.5)]
    # a(x) = 3 - 0.2 (x - 20); b(x) = 2.5 - 0.2 (x - 22) = a(x) - 0.1 on the overlap [22, 30].
    assert matched_difference(a, b) == pytest.approx(0.1)
    assert matched_difference(a, [(40.0, 1.0), (50.0, 0.0)]) is None
    assert above_curve(a, (25.0, 2.5)) == pytest.approx(0.5)
    assert above_curve(a, (35.0, 2.5)) is None
