"""Judge metrics: MT-Bench and AlpacaEval 2.0 graded by any OpenAI-compatible judge.

The pieces, each usable alone: `config` (the `evaluate.judge` section), `data` (the upstream
files), `parsing` (strict verdicts), `client` (the `openai` client and its errors), `store`
(the kill-safe cache), `answers` (the evaluated model's answers), `judging` (bounded, cached
requests), `mt_bench` and `alpaca_eval` (prompts and scores), `length_control` (the GLM),
`server` (a local vLLM judge) and `session` (all of it for one evaluate stage).
Names are loaded on first use: importing the package (the config does) imports neither numpy,
`openai` nor torch.
"""

import importlib

_EXPORTS = {
    "taxfree.eval.judge.config": ["BENCHMARKS", "JudgeConfig"],
    "taxfree.eval.judge.length_control": ["length_controlled_win_rate", "win_rate"],
    "taxfree.eval.judge.parsing": ["parse_choice", "parse_rating"],
    "taxfree.eval.judge.session": ["JUDGE_DIR", "JudgeSession", "judge_inputs", "open_judge", "preflight"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'taxfree.eval.judge' has no attribute {name!r}")


__all__ = [name for names in _EXPORTS.values() for name in names]
