"""Upstream files in, the project's JSONL splits out.

Output layout of a converted data set (one directory, written atomically):
    <out>/<kind>_<split>.jsonl   e.g. pref_train.jsonl, pref_test.jsonl, sft_train.jsonl, kto_test.jsonl
    <out>/conversion.json        source, inputs, split rule, counts per file, skipped rows by reason
Only non-empty files are written. Upstream splits are kept where the input names them; rows
without one are split by prompt (every record made from one prompt lands in the same split, so
many comparisons of one post cannot leak from train into test).
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from taxfree.atomic import atomic_dir, atomic_write_json
from taxfree.data.converters._common import SkipRecord
from taxfree.data.converters.registry import Source, get_source
from taxfree.data.records import iter_jsonl, prompt_key, write_jsonl
from taxfree.errors import TaxfreeError

SPLITS = ("train", "test")
DEFAULT_TEST_FRACTION = 0.05
UPSTREAM_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@dataclass
class ConversionResult:
    """Records by split and kind, in upstream order, plus what was skipped and why."""

    source: str
    records: dict[str, dict[str, list[dict]]] = field(default_factory=lambda: {s: {} for s in SPLITS})
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)

    def counts(self) -> dict[str, int]:
        """{"pref_train.jsonl": n, ...} for every non-empty output file."""
        return {
            f"{kind}_{split}.jsonl": len(recs)
            for split in SPLITS
            for kind, recs in sorted(self.records[split].items())
            if recs
        }

    def describe(self, output_dir: str | os.PathLike | None = None) -> str:
        """Lines a person reads after a conversion: counts per file and skipped rows."""
        head = f"{self.source}: {self.rows} upstream rows"
        if output_dir is not None:
            head += f" -> {output_dir}"
        lines = [head]
        lines += [f"  {name:<22} {n:>8}" for name, n in self.counts().items()]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  skipped {n}: {reason}")
        return "\n".join(lines)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(UPSTREAM_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def read_upstream(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """Yield (where, row) for an upstream file: JSON lines (optionally gzipped), a JSON array, or parquet."""
    path = Path(path)
    if not path.is_file():
        raise TaxfreeError(f"{path}: no such file")
    suffix = _suffix(path)
    if suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix:
        first = _first_char(path) if suffix in (".json", ".json.gz") else ""
        doc = _load_json(path) if first == "[" else _id_mapping(path) if first == "{" else None
        if doc is not None:
            yield from _document_rows(path, doc)
        else:  # JSON lines, also when named .json (TL;DR's batches)
            for lineno, row in iter_jsonl(path):
                yield f"{path}:{lineno}", row
    else:
        raise TaxfreeError(f"{path}: unknown upstream file type (expected one of {', '.join(UPSTREAM_SUFFIXES)})")


def _first_char(path: Path) -> str:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            while True:
                chunk = f.read(1)
                if not chunk or not chunk.isspace():
                    return chunk
    except (OSError, UnicodeDecodeError) as exc:
        raise TaxfreeError(f"{path}: unreadable ({exc})") from None


def _load_json(path: Path):
    """The file as one JSON document; a malformed one is an error naming its line."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise TaxfreeError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaxfreeError(f"{path}: unreadable ({exc})") from None


def _id_mapping(path: Path) -> dict | None:
    """The file as one JSON object of id -> row (chitchat's dataset.json), or None when it is not
    one: JSON lines that happen to start with "{" (or broken: the line reader names the bad line)."""
    try:
        doc = _load_json(path)
    except TaxfreeError:
        return None
    if isinstance(doc, dict) and doc and all(isinstance(v, dict) for v in doc.values()):
        return doc
    return None


def _document_rows(path: Path, doc) -> Iterator[tuple[str, object]]:
    """Rows of a JSON array, or of an object of id -> row (the row gets its id as "id")."""
    if isinstance(doc, dict):
        for key, row in doc.items():
            yield f"{path}: {key}", {"id": key, **row}
        return
    for i, row in enumerate(doc):
        yield f"{path}: item {i + 1}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TaxfreeError(f"{path}: not a readable parquet file ({exc})") from None
    n = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}: row {n}", row


def _test_groups(groups: Sequence[str], test_fraction: float, seed: int) -> set[str]:
    """A seeded choice of round(fraction * groups) groups (at least 1, never all) for the test split."""
    if test_fraction <= 0 or len(groups) < 2:
        return set()
    n_test = min(max(1, round(test_fraction * len(groups))), len(groups) - 1)
    return set(random.Random(seed).sample(list(groups), n_test))


def convert_rows(
    source: str | Source,
    rows: Iterable[tuple[str, object, str | None]],
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
) -> ConversionResult:
    """Convert (where, upstream row, split or None) triples; rows without a split are split by prompt."""
    source = get_source(source) if isinstance(source, str) else source
    if not 0 <= test_fraction < 1:
        raise TaxfreeError(f"test fraction must be in [0, 1), got {test_fraction}")
    result = ConversionResult(source=source.name)
    converted: list[tuple[str | None, str, dict[str, list[dict]]]] = []
    for where, row, split in rows:
        if split is not None and split not in SPLITS:
            raise TaxfreeError(f"{where}: unknown split {split!r} (choose from {', '.join(SPLITS)})")
        result.rows += 1
        try:
            outputs = source.convert(row)
        except SkipRecord as exc:
            result.skipped[str(exc)] += 1
            continue
        except TaxfreeError as exc:
            raise TaxfreeError(f"{where}: {exc}") from None
        first = next((recs[0] for recs in outputs.values() if recs), None)
        if first is None:
            result.skipped["no records"] += 1
            continue
        converted.append((split, prompt_key(first), outputs))
    if result.rows == 0:
        raise TaxfreeError(f"{source.name}: no upstream rows (empty data set)")
    if not converted:
        reasons = "; ".join(f"{n} {r}" for r, n in result.skipped.most_common())
        raise TaxfreeError(f"{source.name}: all {result.rows} upstream rows were skipped ({reasons})")

    if source.combine is not None:  # split row by row, then pair within each split
        converted = [(split, f"row {i}", outputs) for i, (split, _, outputs) in enumerate(converted)]
    unsplit = list(dict.fromkeys(key for split, key, _ in converted if split is None))
    test = _test_groups(unsplit, test_fraction, seed)
    for split, key, outputs in converted:
        split = split or ("test" if key in test else "train")
        for kind, recs in outputs.items():
            result.records[split].setdefault(kind, []).extend(recs)
    if source.combine is not None:
        for split in SPLITS:
            candidates = [c for recs in result.records[split].values() for c in recs]
            result.records[split] = {k: v for k, v in source.combine(candidates, seed).items() if v}
        if not result.records["train"]:
            raise TaxfreeError(f"{source.name}: the {result.rows} upstream rows made no training records")
    return result


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing non-empty output before any work is done (atomic_dir checks again at the end)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise TaxfreeError(f"{out}: output exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TaxfreeError(f"{out}: output directory exists and is not empty (use --force to replace it)")


def write_result(
    result: ConversionResult, output_dir: str | os.PathLike, provenance: Mapping, overwrite: bool = False
) -> None:
    """Write every non-empty <kind>_<split>.jsonl (validated) and conversion.json, all or nothing."""
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        for split in SPLITS:
            for kind, recs in result.records[split].items():
                if recs:
                    write_jsonl(Path(tmp) / f"{kind}_{split}.jsonl", recs, kind=kind)
        summary = {
            "source": result.source,
            **provenance,
            "upstream_rows": result.rows,
            "files": result.counts(),
            "skipped": dict(result.skipped.most_common()),
        }
        atomic_write_json(Path(tmp) / "conversion.json", summary)


def _labelled_inputs(inputs) -> list[tuple[Path, str | None]]:
    if isinstance(inputs, (str, os.PathLike)):
        return [(Path(inputs), None)]
    if isinstance(inputs, Mapping):
        pairs = []
        for split, paths in inputs.items():
            if split not in SPLITS:
                raise TaxfreeError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
            for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
                pairs.append((Path(p), split))
        return pairs
    return [(Path(p), None) for p in inputs]


def convert_file(
    source: str,
    input_path,
    output_dir: str | os.PathLike,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert upstream file(s) of `source` into <output_dir>/<kind>_<split>.jsonl.

    `input_path` is a path, a list of paths (split by prompt with `test_fraction` and `seed`),
    or {"train": path(s), "test": path(s)} to keep the upstream splits.
    """
    src = get_source(source)
    check_output_dir(output_dir, overwrite)
    inputs = _labelled_inputs(input_path)
    if not inputs:
        raise TaxfreeError("no input files")
    rows = ((where, row, split) for path, split in inputs for where, row in read_upstream(path))
    result = convert_rows(src, rows, test_fraction=test_fraction, seed=seed)
    provenance = {
        "inputs": [{"path": str(p), "split": s} for p, s in inputs],
        "test_fraction": test_fraction,
        "seed": seed,
    }
    write_result(result, output_dir, provenance, overwrite=overwrite)
    return result
