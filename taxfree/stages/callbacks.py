"""Trainer callbacks the stages share."""

from __future__ import annotations

from transformers import TrainerCallback


class LastLogs(TrainerCallback):
    """Keeps the last logged train and eval metrics.

    TRL trainers add their own metrics (reward accuracies, margins, log-probs) only to the logs,
    not to what `evaluate()` returns; the manifests want them.
    """

    def __init__(self):
        self.train: dict = {}
        self.eval: dict = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if any(k.startswith("eval_") for k in logs):
            self.eval.update(logs)
        else:
            self.train.update(logs)


def numeric(logs: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in logs.items():
        try:
            out[prefix + k] = float(v)
        except (TypeError, ValueError):
            continue
    return out
