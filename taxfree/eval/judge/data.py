"""The judge benchmarks' data files, in their upstream formats, read and checked.

Layout below `evaluate.judge.data_dir` (what `scripts/download_data.sh mt_bench|alpaca_eval`
writes, the upstream file names):

- `mt_bench/question.jsonl`: FastChat's questions, `{"question_id", "category", "turns": [2 str],
  "reference"?}`;
- `mt_bench/judge_prompts.jsonl`: FastChat's judge prompts, `{"name", "type", "system_prompt",
  "prompt_template", "output_format", ...}`; MT-Bench uses single-v1, single-v1-multi-turn,
  single-math-v1, single-math-v1-multi-turn, AlpacaEval uses pair-v2;
- `mt_bench/reference_answer/gpt-4.jsonl`: FastChat's reference answers,
  `{"question_id", "choices": [{"turns": [str, str]}], ...}`;
- `alpaca_eval/alpaca_eval.json`: AlpacaEval 2.0's reference outputs, a JSON list of
  `{"instruction", "output", "generator", "dataset"}`.

Every problem is a TaxfreeError naming the file and line (or item), raised before any model is
evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from taxfree.errors import TaxfreeError

MT_BENCH_QUESTIONS = Path("mt_bench") / "question.jsonl"
JUDGE_PROMPTS = Path("mt_bench") / "judge_prompts.jsonl"
MT_BENCH_REFERENCES = Path("mt_bench") / "reference_answer" / "gpt-4.jsonl"
ALPACA_EVAL = Path("alpaca_eval") / "alpaca_eval.json"

MT_BENCH_PROMPTS = ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn")
ALPACA_EVAL_PROMPT = "pair-v2"
# FastChat grades these categories against a reference answer (its NEED_REF_CATS).
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")


def files_for(benchmarks, data_dir: str | Path) -> dict[str, Path]:
    """{input name: path} of the files the listed benchmarks read."""
    root = Path(data_dir)
    out: dict[str, Path] = {}
    if "mt_bench" in benchmarks:
        out["judge:mt_bench/question.jsonl"] = root / MT_BENCH_QUESTIONS
        out["judge:mt_bench/reference_answer/gpt-4.jsonl"] = root / MT_BENCH_REFERENCES
    out["judge:mt_bench/judge_prompts.jsonl"] = root / JUDGE_PROMPTS  # both benchmarks' prompts
    if "alpaca_eval" in benchmarks:
        out["judge:alpaca_eval/alpaca_eval.json"] = root / ALPACA_EVAL
    return out


def _missing(path: Path, benchmark: str) -> TaxfreeError:
    return TaxfreeError(f"{path}: file not found (run `scripts/download_data.sh {benchmark}`, or point "
                        "evaluate.judge.data_dir at the directory holding it)")


def _jsonl(path: Path, benchmark: str) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise _missing(path, benchmark)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TaxfreeError(f"{path}: unreadable ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaxfreeError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TaxfreeError(f"{path}:{lineno}: expected a JSON object")
        out.append((lineno, obj))
    if not out:
        raise TaxfreeError(f"{path}: empty")
    return out


def _str(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        raise TaxfreeError(f"{where}: '{key}' must be a non-empty string")
    return v


@dataclass
class JudgePrompt:
    """One of FastChat's judge prompts: the system message and the user template."""

    name: str
    type: str  # single | pairwise
    system_prompt: str
    prompt_template: str
    output_format: str  # [[rating]] | [[A]]

    def messages(self, **fields) -> list[dict]:
        try:
            user = self.prompt_template.format_map(fields)
        except (KeyError, IndexError, ValueError) as e:
            raise TaxfreeError(f"judge prompt {self.name}: its template needs a field it was not given ({e})") from None
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]


def load_judge_prompts(path: Path, names: tuple[str, ...]) -> dict[str, JudgePrompt]:
    prompts: dict[str, JudgePrompt] = {}
    for lineno, obj in _jsonl(path, "mt_bench"):
        where = f"{path}:{lineno}"
        name = _str(obj, "name", where)
        if name not in names:
            continue
        prompts[name] = JudgePrompt(name, _str(obj, "type", where), _str(obj, "system_prompt", where, allow_empty=True),
                                    _str(obj, "prompt_template", where), _str(obj, "output_format", where))
    missing = [n for n in names if n not in prompts]
    if missing:
        raise TaxfreeError(f"{path}: no judge prompt named {', '.join(missing)} (FastChat's judge_prompts.jsonl has them)")
    for name, p in prompts.items():
        want = ("pairwise", "[[A]]") if name.startswith("pair") else ("single", "[[rating]]")
        if (p.type, p.output_format) != want:
            raise TaxfreeError(f"{path}: judge prompt {name}: expected type {want[0]} with output_format {want[1]}, "
                               f"got {p.type} / {p.output_format}")
    return prompts


@dataclass
class MTBenchQuestion:
    question_id: int
    category: str
    turns: list[str]
    reference: list[str] | None = None  # the reference answer's two turns (reference categories)

    @property
    def needs_reference(self) -> bool:
        return self.category in REFERENCE_CATEGORIES


def load_mt_bench(data_dir: str | Path, limit: int | None = None) -> list[MTBenchQuestion]:
    """The questions (first `limit`), each reference category's question with its reference answer."""
    root = Path(data_dir)
    qpath, rpath = root / MT_BENCH_QUESTIONS, root / MT_BENCH_REFERENCES
    questions: list[MTBenchQuestion] = []
    seen: set[int] = set()
    for lineno, obj in _jsonl(qpath, "mt_bench"):
        where = f"{qpath}:{lineno}"
        qid = obj.get("question_id")
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise TaxfreeError(f"{where}: 'question_id' must be an integer")
        if qid in seen:
            raise TaxfreeError(f"{where}: question_id {qid} appears twice")
        seen.add(qid)
        turns = obj.get("turns")
        if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, str) and t.strip() for t in turns):
            raise TaxfreeError(f"{where}: 'turns' must be a list of two non-empty strings (MT-Bench is two-turn)")
        questions.append(MTBenchQuestion(qid, _str(obj, "category", where), list(turns)))
    if limit is not None:
        questions = questions[:limit]
    references: dict[int, list[str]] = {}
    if any(q.needs_reference for q in questions):
        for lineno, obj in _jsonl(rpath, "mt_bench"):
            where = f"{rpath}:{lineno}"
            choices = obj.get("choices")
            turns = choices[0].get("turns") if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
            if not isinstance(obj.get("question_id"), int) or not isinstance(turns, list) or len(turns) < 2 \
                    or not all(isinstance(t, str) for t in turns[:2]):
                raise TaxfreeError(f"{where}: expected question_id and choices[0].turns with two answers")
            references[obj["question_id"]] = list(turns[:2])
    for q in questions:
        if q.needs_reference:
            if q.question_id not in references:
                raise TaxfreeError(f"{rpath}: no reference answer for question {q.question_id} ({q.category} "
                                   "questions are graded against one)")
            q.reference = references[q.question_id]
    return questions


@dataclass
class AlpacaEvalItem:
    index: int  # position in alpaca_eval.json
    instruction: str
    reference: str  # the reference model's output
    generator: str | None = None


def load_alpaca_eval(data_dir: str | Path, limit: int | None = None) -> list[AlpacaEvalItem]:
    path = Path(data_dir) / ALPACA_EVAL
    if not path.is_file():
        raise _missing(path, "alpaca_eval")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TaxfreeError(f"{path}: unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise TaxfreeError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, list) or not data:
        raise TaxfreeError(f"{path}: expected a non-empty JSON list of {{instruction, output, generator, dataset}}")
    items = []
    for i, obj in enumerate(data[:limit] if limit is not None else data):
        where = f"{path}: item {i}"
        if not isinstance(obj, dict):
            raise TaxfreeError(f"{where}: expected a JSON object")
        gen = obj.get("generator")
        items.append(AlpacaEvalItem(i, _str(obj, "instruction", where), _str(obj, "output", where, allow_empty=True),
                                    gen if isinstance(gen, str) else None))
    return items


def check_data(benchmarks, data_dir: str | Path, limit: int | None = None) -> None:
    """Read every file the benchmarks need; raise on the first problem."""
    names = tuple(MT_BENCH_PROMPTS if "mt_bench" in benchmarks else ()) + \
        ((ALPACA_EVAL_PROMPT,) if "alpaca_eval" in benchmarks else ())
    if "mt_bench" in benchmarks:
        load_mt_bench(data_dir, limit)
    if "alpaca_eval" in benchmarks:
        load_alpaca_eval(data_dir, limit)
    load_judge_prompts(Path(data_dir) / JUDGE_PROMPTS, names)
