"""AlpacaEval 2.0 (Dubois et al.): the model's answer against the reference output, per instruction.

The judge sees the instruction and the two answers as assistant A and assistant B in FastChat's
pairwise prompt (pair-v2: `[[A]]`, `[[B]]`, or `[[C]]` for a tie). Which side the model takes is
drawn per item from the run's seed and the instruction text, so the order is the same on every
re-run and for every model, independent of the other items, and half the items (in expectation)
show the model first. The model's outcome is 1 for a win, 0.5 for a tie, 0 for a loss; the win
rate is their mean in percent, the length-controlled win rate comes from
taxfree.eval.judge.length_control. Replies that could not be read are failures, counted and left
out of both.

The official AlpacaEval 2.0 annotator (weighted_alpaca_eval_gpt4_turbo) reads a GPT-4 Turbo
log-probability instead of a verdict; this pairwise prompt works with any OpenAI-compatible judge,
so the numbers compare the models of a run, not a leaderboard. The answers are also written in
AlpacaEval's model_outputs format for the official tool.
"""

from __future__ import annotations

import hashlib

from taxfree.eval.judge.data import ALPACA_EVAL_PROMPT, AlpacaEvalItem, JudgePrompt
from taxfree.eval.judge.judging import Job
from taxfree.eval.judge.length_control import length_controlled_win_rate, win_rate
from taxfree.eval.judge.parsing import parse_choice

BENCHMARK = "alpaca_eval"


def model_first(seed: int, instruction: str) -> bool:
    """Whether the model's answer is assistant A for this item (a fair coin fixed by seed and text)."""
    digest = hashlib.sha256(f"{seed}\0{instruction}".encode("utf-8")).digest()
    return digest[0] % 2 == 0


def conversation(item: AlpacaEvalItem) -> list[dict]:
    return [{"role": "user", "content": item.instruction}]


def judge_jobs(items: list[AlpacaEvalItem], answers: list[str], prompts: dict[str, JudgePrompt], seed: int) -> list[Job]:
    prompt = prompts[ALPACA_EVAL_PROMPT]
    jobs = []
    for item, answer in zip(items, answers):
        a, b = (answer, item.reference) if model_first(seed, item.instruction) else (item.reference, answer)
        jobs.append(Job(BENCHMARK, item.index, 1, prompt.messages(question=item.instruction, answer_a=a, answer_b=b),
                        parse_choice, ALPACA_EVAL_PROMPT))
    return jobs


def outcome(choice: str, first: bool) -> float:
    """The model's result from the judge's choice of position."""
    if choice == "tie":
        return 0.5
    return 1.0 if (choice == "A") == first else 0.0


def score(items: list[AlpacaEvalItem], answers: list[str], entries: list[dict], seed: int) -> dict:
    outcomes, model_len, ref_len = [], [], []
    for item, answer, e in zip(items, answers, entries):
        if e.get("failure") is not None:
            continue
        outcomes.append(outcome(e["verdict"], model_first(seed, item.instruction)))
        model_len.append(len(answer))
        ref_len.append(len(item.reference))
    return {
        "alpaca_eval_wr": win_rate(outcomes),
        "alpaca_eval_lc": length_controlled_win_rate(outcomes, model_len, ref_len),
        "alpaca_eval_judged": len(outcomes),
        "alpaca_eval_failures": sum(1 for e in entries if e.get("failure") is not None),
        "alpaca_eval_avg_length": sum(len(a) for a in answers) / len(answers) if answers else None,
    }
