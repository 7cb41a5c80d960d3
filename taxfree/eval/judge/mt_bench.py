"""MT-Bench (Zheng et al. 2023): single-answer grading of two-turn answers, as FastChat does it.

The evaluated model answers turn 1, then turn 2 with its own turn-1 answer in the conversation.
The judge rates each turn 1-10 with FastChat's prompts, chosen as its gen_judgment.py does:

| category                      | turn 1           | turn 2                      |
|-------------------------------|------------------|-----------------------------|
| math, reasoning, coding       | single-math-v1   | single-math-v1-multi-turn   |
| every other category          | single-v1        | single-v1-multi-turn        |

The "math" prompts show the reference answer (reference_answer/gpt-4.jsonl); the multi-turn ones
show the whole conversation and ask about the second answer. The score is the mean of every
judged turn (FastChat's show_result "Average": turns 1 and 2 pooled), per category likewise;
turns whose reply could not be read are failures, counted and left out of the means.
"""

from __future__ import annotations

from taxfree.eval.judge.data import JudgePrompt, MTBenchQuestion
from taxfree.eval.judge.judging import Job
from taxfree.eval.judge.parsing import parse_rating

BENCHMARK = "mt_bench"


def prompt_name(question: MTBenchQuestion, turn: int) -> str:
    base = "single-math-v1" if question.needs_reference else "single-v1"
    return base + ("-multi-turn" if turn == 2 else "")


def conversations(question: MTBenchQuestion, first_answer: str | None = None) -> list[dict]:
    """What the evaluated model sees: turn 1 alone, or turn 1, its own answer and turn 2."""
    if first_answer is None:
        return [{"role": "user", "content": question.turns[0]}]
    return [{"role": "user", "content": question.turns[0]}, {"role": "assistant", "content": first_answer},
            {"role": "user", "content": question.turns[1]}]


def judge_jobs(questions: list[MTBenchQuestion], answers: dict[int, list[str]],
               prompts: dict[str, JudgePrompt]) -> list[Job]:
    """Two jobs per question (turns 1 and 2), the prompts filled in as FastChat fills them."""
    jobs = []
    for q in questions:
        a1, a2 = answers[q.question_id]
        ref = {"ref_answer_1": q.reference[0], "ref_answer_2": q.reference[1]} if q.needs_reference else {}
        name = prompt_name(q, 1)
        fields = {"question": q.turns[0], "answer": a1, **({"ref_answer_1": ref["ref_answer_1"]} if ref else {})}
        jobs.append(Job(BENCHMARK, q.question_id, 1, prompts[name].messages(**fields), parse_rating, name))
        name = prompt_name(q, 2)
        fields = {"question_1": q.turns[0], "question_2": q.turns[1], "answer_1": a1, "answer_2": a2, **ref}
        jobs.append(Job(BENCHMARK, q.question_id, 2, prompts[name].messages(**fields), parse_rating, name))
    return jobs


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def score(questions: list[MTBenchQuestion], entries: list[dict]) -> dict:
    """mt_bench (1-10), by category and by turn, judged turns and failures, from the jobs' entries."""
    category = {q.question_id: q.category for q in questions}
    ratings = [(e["item"], e["turn"], float(e["verdict"])) for e in entries if e.get("failure") is None]
    cats = list(dict.fromkeys(q.category for q in questions))
    by_cat = {c: _mean([r for qid, _, r in ratings if category[qid] == c]) for c in cats}
    return {
        "mt_bench": _mean([r for _, _, r in ratings]),
        "mt_bench_by_category": by_cat,
        "mt_bench_by_turn": {str(t): _mean([r for _, tt, r in ratings if tt == t]) for t in (1, 2)},
        "mt_bench_judged": len(ratings),
        "mt_bench_failures": sum(1 for e in entries if e.get("failure") is not None),
    }
