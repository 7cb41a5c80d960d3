"""AlpacaEval 2.0's length-controlled win rate, fitted by taxfree itself.

Judges prefer longer answers. The length-controlled win rate (Dubois et al. 2024, "Length-
Controlled AlpacaEval") asks what the win rate would be if the model's answers were as long as
the reference's: fit a logistic regression (a GLM) of the judge's preference on the length
difference, then predict with the difference set to zero.

For one model against the reference, item i with outcome y_i in {0, 0.5, 1} (1: the model's
answer preferred, 0.5: a tie) and length difference d_i = len(model answer) - len(reference),
in characters:

    P(model preferred on i) = sigmoid(theta + phi * tanh(d_i / sd(d)))

with sd the sample standard deviation (ddof 1). Ties enter as half a win and half a loss (the
fractional target of a cross-entropy). theta and phi maximise the likelihood plus a small ridge
penalty (`ridge`, which only matters when one outcome separates the data, e.g. every item won:
the maximum likelihood is then at infinity); the fit is Newton's method with step halving.
The length-controlled win rate is 100 * sigmoid(theta). With all lengths equal (sd = 0) the
length term is left out.

This is the published GLM's length term and model term. Its third term, a per-instruction
difficulty fitted across the AlpacaEval leaderboard's models, and its regularisation towards
annotations of length-gamed baselines are leaderboard data for the official annotator, not
something one run has, so they are left out (the alpaca-eval package calls this variant
`length_controlled_minimal`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from taxfree.errors import TaxfreeError

RIDGE = 1e-4


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def length_features(model_lengths: Sequence[float], reference_lengths: Sequence[float]) -> np.ndarray:
    """The design matrix: a column of ones (theta) and, when lengths differ, tanh(d / sd(d)) (phi)."""
    d = np.asarray(model_lengths, dtype=np.float64) - np.asarray(reference_lengths, dtype=np.float64)
    ones = np.ones((len(d), 1))
    sd = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
    if not sd > 0:
        return ones
    return np.concatenate([ones, np.tanh(d / sd)[:, None]], axis=1)


def penalized_nll(w: np.ndarray, x: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> float:
    """The objective: negative log-likelihood of the fractional targets plus ridge / 2 * |w|^2."""
    z = x @ w
    # -[y log s(z) + (1 - y) log(1 - s(z))] = log(1 + e^z) - y z
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * ridge * (w @ w))


def fit_glm(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE, max_iter: int = 200, tol: float = 1e-12) -> np.ndarray:
    """The weights minimising `penalized_nll` (convex: Newton's method with step halving)."""
    w = np.zeros(x.shape[1])
    loss = penalized_nll(w, x, y, ridge)
    for _ in range(max_iter):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + ridge * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:
            cand = w - t * step
            cand_loss = penalized_nll(cand, x, y, ridge)
            if cand_loss <= loss or t < 1e-10:
                break
            t /= 2
        w, improvement, loss = cand, loss - cand_loss, cand_loss
        if np.max(np.abs(t * step)) < 1e-10 or improvement < tol:
            break
    return w


def length_controlled_win_rate(outcomes: Sequence[float], model_lengths: Sequence[float],
                               reference_lengths: Sequence[float], ridge: float = RIDGE) -> float | None:
    """100 * P(model preferred) at equal length, in percent; None without outcomes."""
    y = np.asarray(outcomes, dtype=np.float64)
    if not (len(y) == len(model_lengths) == len(reference_lengths)):
        raise TaxfreeError("length-controlled win rate: outcomes and lengths differ in number")
    if len(y) == 0:
        return None
    if np.any((y < 0) | (y > 1)):
        raise TaxfreeError("length-controlled win rate: outcomes must lie in [0, 1]")
    w = fit_glm(length_features(model_lengths, reference_lengths), y, ridge)
    return 100.0 * float(_sigmoid(np.asarray(w[0])))


def win_rate(outcomes: Sequence[float]) -> float | None:
    """Plain win rate in percent (ties count half); None without outcomes."""
    return 100.0 * sum(outcomes) / len(outcomes) if outcomes else None
