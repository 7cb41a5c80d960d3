"""Benchmarks from local jsonl files, written as lm-eval task YAMLs.

The tiny world (and anyone with a private test set) measures the alignment tax on items that
live on disk, not on the hub. Rather than a second evaluation loop, we describe those items as
ordinary lm-eval tasks (`dataset_path: json` + `dataset_kwargs: {data_files: ...}`), so they are
scored by exactly the same code, prompts and metrics machinery as the public benchmarks, and the
same `run_lm_eval(..., include_path=...)` call runs both.

Two task shapes, one jsonl record per line:

- `multiple_choice` (loglikelihood): `{"query": str, "choices": [str, ...], "gold": int}`.
  Each choice is scored as the continuation `query + target_delimiter + choice`; metrics `acc`
  (argmax of the summed log-likelihood) and `acc_norm` (the same, per byte of the choice).
- `exact_match` (generate-until): `{"question": str, "answer": str}`. Greedy generation after
  `question`, cut at the first `until` string; metric `exact_match` after stripping leading and
  trailing whitespace, case-insensitive.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from taxfree.atomic import atomic_write_text
from taxfree.errors import TaxfreeError

TaskKind = Literal["multiple_choice", "exact_match"]
TASK_KINDS: tuple[str, ...] = ("multiple_choice", "exact_match")

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class LocalTaskSpec:
    """One lm-eval task over a local jsonl file.

    `fewshot_path` (optional, same record format) supplies the few-shot examples; without it
    `num_fewshot` must be 0, because drawing examples from the test items would leak answers.
    """

    name: str
    kind: TaskKind
    data_path: str | Path
    num_fewshot: int = 0
    fewshot_path: str | Path | None = None
    description: str = ""
    target_delimiter: str = " "
    max_gen_toks: int = 32
    until: tuple[str, ...] = ("\n",)
    tags: tuple[str, ...] = field(default_factory=tuple)


def _read_jsonl(path: Path, what: str) -> list[dict]:
    if not path.is_file():
        raise TaxfreeError(f"{what}: no such file: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaxfreeError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise TaxfreeError(f"{path}:{lineno}: each line must be a JSON object")
            records.append(rec)
    if not records:
        raise TaxfreeError(f"{path}: no records")
    return records


def _check_record(kind: str, rec: dict, where: str) -> None:
    if kind == "multiple_choice":
        query, choices, gold = rec.get("query"), rec.get("choices"), rec.get("gold")
        if not isinstance(query, str):
            raise TaxfreeError(f"{where}: 'query' must be a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaxfreeError(f"{where}: 'choices' must be a list of at least 2 strings")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise TaxfreeError(f"{where}: 'gold' must be an integer index into 'choices' (0..{len(choices) - 1})")
    else:
        question, answer = rec.get("question"), rec.get("answer")
        if not isinstance(question, str):
            raise TaxfreeError(f"{where}: 'question' must be a string")
        if not isinstance(answer, str) or not answer.strip():
            raise TaxfreeError(f"{where}: 'answer' must be a non-empty string")


def _validate_file(kind: str, path: Path, what: str) -> int:
    records = _read_jsonl(path, what)
    for i, rec in enumerate(records, 1):
        _check_record(kind, rec, f"{path}: record {i}")
    return len(records)


def _validate_spec(spec: LocalTaskSpec) -> None:
    if not isinstance(spec.name, str) or not _NAME_RE.match(spec.name):
        raise TaxfreeError(
            f"local task name {spec.name!r}: use letters, digits, '_' or '-', starting with a letter"
        )
    if spec.kind not in TASK_KINDS:
        raise TaxfreeError(f"local task {spec.name}: kind {spec.kind!r} is not one of {', '.join(TASK_KINDS)}")
    if spec.num_fewshot < 0:
        raise TaxfreeError(f"local task {spec.name}: num_fewshot must be >= 0")
    if spec.num_fewshot > 0 and spec.fewshot_path is None:
        raise TaxfreeError(
            f"local task {spec.name}: num_fewshot={spec.num_fewshot} needs fewshot_path "
            "(few-shot examples are never drawn from the test items)"
        )
    if spec.kind == "exact_match":
        if spec.max_gen_toks < 1:
            raise TaxfreeError(f"local task {spec.name}: max_gen_toks must be >= 1")
        if not spec.until or not all(isinstance(u, str) and u for u in spec.until):
            raise TaxfreeError(f"local task {spec.name}: until must list non-empty stop strings")


def task_config(spec: LocalTaskSpec, test_file: Path, fewshot_file: Path | None) -> dict:
    """The lm-eval task config (as a dict) for `spec`, reading the given files."""
    data_files = {"test": str(test_file)}
    if fewshot_file is not None:
        data_files["train"] = str(fewshot_file)
    cfg: dict = {"task": spec.name}
    if spec.tags:
        cfg["tag"] = list(spec.tags)
    cfg.update(
        {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": data_files},
            "test_split": "test",
        }
    )
    if fewshot_file is not None:
        cfg["training_split"] = "train"
        cfg["fewshot_split"] = "train"
    if spec.description:
        cfg["description"] = spec.description
    cfg["num_fewshot"] = spec.num_fewshot
    cfg["target_delimiter"] = spec.target_delimiter
    if spec.kind == "multiple_choice":
        cfg.update(
            {
                "output_type": "multiple_choice",
                # bare column names: lm-eval reads the field as it is (a list / an int)
                "doc_to_text": "query",
                "doc_to_choice": "choices",
                "doc_to_target": "gold",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
            }
        )
    else:
        cfg.update(
            {
                "output_type": "generate_until",
                "doc_to_text": "question",
                "doc_to_target": "answer",
                "generation_kwargs": {
                    "until": list(spec.until),
                    "do_sample": False,
                    "max_gen_toks": spec.max_gen_toks,
                },
                "metric_list": [
                    {
                        "metric": "exact_match",
                        "aggregation": "mean",
                        "higher_is_better": True,
                        "ignore_case": True,
                        "ignore_punctuation": False,
                        "regexes_to_ignore": [r"^\s+", r"\s+$"],
                    }
                ],
            }
        )
    cfg["metadata"] = {"version": 1.0}
    return cfg


def write_local_tasks(out_dir: str | Path, specs: list[LocalTaskSpec]) -> str:
    """Validate every spec and its data, copy the data next to the YAMLs, return the include path.

    The directory is self-contained (`<name>.yaml`, `<name>/test.jsonl`, `<name>/fewshot.jsonl`)
    so a run manifest can hash it and a later run reads exactly the same items.
    """
    if not specs:
        raise TaxfreeError("write_local_tasks: no task specs given")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TaxfreeError(f"local tasks: duplicate task names: {', '.join(dupes)}")
    for spec in specs:
        _validate_spec(spec)
        _validate_file(spec.kind, Path(spec.data_path), f"local task {spec.name}")
        if spec.fewshot_path is not None:
            n = _validate_file(spec.kind, Path(spec.fewshot_path), f"local task {spec.name} (fewshot)")
            if n < spec.num_fewshot:
                raise TaxfreeError(
                    f"local task {spec.name}: num_fewshot={spec.num_fewshot} but {spec.fewshot_path} has {n} records"
                )

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        data_dir = out / spec.name
        data_dir.mkdir(exist_ok=True)
        test_file = data_dir / "test.jsonl"
        shutil.copyfile(spec.data_path, test_file)
        fewshot_file = None
        if spec.fewshot_path is not None:
            fewshot_file = data_dir / "fewshot.jsonl"
            shutil.copyfile(spec.fewshot_path, fewshot_file)
        cfg = task_config(spec, test_file, fewshot_file)
        atomic_write_text(out / f"{spec.name}.yaml", yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return str(out)
