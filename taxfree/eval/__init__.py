"""Evaluation: reward-model scores, PairRM win rates, benchmarks (lm-eval, OpenCompass).

Submodules import their heavy dependencies (lm-eval, transformers models) lazily, and the names
below are loaded on first use, so importing `taxfree.eval` (or the config, which imports
`taxfree.eval.judge.config`) stays cheap. The tax tables, report and plots live beside these modules.
"""

import importlib

_EXPORTS = {
    "taxfree.eval.local_tasks": ["LocalTaskSpec", "write_local_tasks"],
    "taxfree.eval.lm_eval_runner": ["flatten_lm_eval_results", "run_lm_eval"],
    "taxfree.eval.opencompass": ["OpenCompassDataset", "OpenCompassModel", "collect_opencompass_results",
                                 "parse_opencompass_summary", "run_opencompass", "transformers4_view",
                                 "write_opencompass_config"],
    "taxfree.eval.pairrm": ["PairRM", "preference_probability", "win_rate", "win_rate_from_logits"],
    "taxfree.eval.reward": ["score_with_reward_model"],
    "taxfree.eval.suites": ["SUITES", "BenchmarkSuite", "BenchmarkTask", "get_suite", "suite_average"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'taxfree.eval' has no attribute {name!r}")


__all__ = [name for names in _EXPORTS.values() for name in names]
