"""taxfree's length-controlled win rate against the alpaca-eval package's fit, on synthetic judgements.

alpaca-eval does not import beside the project's pins (it needs pkg_resources), so this runs in a
throwaway environment (it needs only numpy besides alpaca-eval; taxfree is read from the source):

    python3 -m venv /tmp/aevenv && /tmp/aevenv/bin/pip install "setuptools<81" alpaca-eval==0.6.6
    /tmp/aevenv/bin/python bench/judge_length_control.py

Both fit the length term of AlpacaEval 2.0's GLM (alpaca-eval's `length_controlled_minimal`
formula, `np.tanh(std_delta_len) + not_gamed_baseline - 1`) to the same outcomes: alpaca-eval with
its `fit_LogisticRegressionCV` (L1 penalty, strength chosen by 5-fold cross-validation), taxfree
with a fixed 1e-4 ridge (taxfree.eval.judge.length_control). Prints one line per synthetic model.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from alpaca_eval.metrics import glm_winrate  # noqa: E402

from taxfree.eval.judge.length_control import length_controlled_win_rate  # noqa: E402

FORMULA = "np.tanh(std_delta_len) + not_gamed_baseline.astype(float) - 1"

for seed, (theta, phi, n) in enumerate([(0.3, 1.0, 805), (-1.0, 0.6, 805), (0.0, 2.0, 805), (1.5, 0.3, 400),
                                        (-0.5, 1.5, 805)]):
    rng = np.random.default_rng(seed)
    ref = rng.integers(200, 2000, n)
    model = np.maximum(1, ref + rng.integers(-800, 1500, n))
    d = model - ref
    p = 1 / (1 + np.exp(-(theta + phi * np.tanh(d / d.std(ddof=1)))))
    y = (rng.random(n) < p).astype(float)
    y[rng.random(n) < 0.05] = 0.5  # ties
    # alpaca-eval's convention: std_delta_len = len(reference) - len(model); preference for the model.
    df = pd.DataFrame({"preference": y, "std_delta_len": (ref - model) / (ref - model).std(), "not_gamed_baseline": True})
    test = df[["not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0
    train, test_x = glm_winrate.make_dmatrix_for_model(df, test, formula=FORMULA)
    fit = glm_winrate.fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, n_splits=5)
    theirs = fit.predict_proba(test_x)[:, 1].mean() * 100
    ours = length_controlled_win_rate(y, model, ref)
    print(f"n={n} theta={theta:+.1f} phi={phi:.1f}: win rate {100 * y.mean():.2f}  LC taxfree {ours:.2f}  "
          f"LC alpaca-eval {theirs:.2f}  difference {ours - theirs:+.2f}")
