"""Evaluation: reward-model scores, PairRM win rates, benchmarks (lm-eval, OpenCompass).

Submodules import their heavy dependencies (lm-eval, transformers models) lazily, so importing
`taxfree.eval` stays cheap. The tax tables, report and plots live beside these modules.
"""

from taxfree.eval.local_tasks import LocalTaskSpec, write_local_tasks
from taxfree.eval.lm_eval_runner import flatten_lm_eval_results, run_lm_eval
from taxfree.eval.opencompass import (
    OpenCompassDataset,
    OpenCompassModel,
    collect_opencompass_results,
    parse_opencompass_summary,
    run_opencompass,
    transformers4_view,
    write_opencompass_config,
)
from taxfree.eval.pairrm import PairRM, preference_probability, win_rate, win_rate_from_logits
from taxfree.eval.reward import score_with_reward_model
from taxfree.eval.suites import SUITES, BenchmarkSuite, BenchmarkTask, get_suite, suite_average

__all__ = [
    "LocalTaskSpec",
    "write_local_tasks",
    "run_lm_eval",
    "flatten_lm_eval_results",
    "OpenCompassDataset",
    "OpenCompassModel",
    "write_opencompass_config",
    "run_opencompass",
    "parse_opencompass_summary",
    "collect_opencompass_results",
    "transformers4_view",
    "PairRM",
    "win_rate",
    "win_rate_from_logits",
    "preference_probability",
    "score_with_reward_model",
    "SUITES",
    "BenchmarkSuite",
    "BenchmarkTask",
    "get_suite",
    "suite_average",
]
