"""OpenCompass, for the benchmarks only it has (Math401, DS-1000, ...), driven from outside.

OpenCompass 0.5.x pins transformers<5, datasets<4, numpy<2 and pyarrow<21, which cannot share
an environment with this project, so it lives in its own virtualenv (`make opencompass-env`
builds `.opencompass-venv`) and we talk to it only through files and a subprocess:

1. `write_opencompass_config` writes a Python config that OpenCompass reads: dataset lists
   imported from `opencompass.configs.datasets...` inside `read_base()`, and one
   `HuggingFacewithChatTemplate` (chat) or `HuggingFaceBaseModel` (base) entry per model
   directory.
2. `run_opencompass` runs `<venv>/bin/opencompass CONFIG --work-dir WORK_DIR` (an argument
   list, never a shell string). OpenCompass writes `WORK_DIR/<YYYYmmdd_HHMMSS>/` with
   `predictions/`, `results/`, `logs/{infer,eval}/<model>/<dataset>.out` and
   `summary/summary_<YYYYmmdd_HHMMSS>.csv` (columns dataset, version, metric, mode, one per model
   abbr; a failed task shows as '-').
3. `parse_opencompass_summary` reads that CSV back. A '-' is never passed on as a number or
   silently dropped: `run_opencompass` raises `TaxfreeError` naming the log of the task that
   failed (OpenCompass itself exits 0 when a task inside it fails).
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from taxfree.atomic import atomic_write_text
from taxfree.errors import TaxfreeError

DEFAULT_OPENCOMPASS_VENV = ".opencompass-venv"
_TIMESTAMP_RE = re.compile(r"^\d{8}_\d{6}$")
_PY_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_ABBR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class OpenCompassDataset:
    """A dataset list from OpenCompass's own configs: `from <module> import <variable>`."""

    module: str
    variable: str


# Verified against the opencompass 0.5.4 wheel (opencompass/configs/datasets/...).
# Math23K is not among the datasets OpenCompass 0.5.4 ships configs for: add your own entry
# (an importable config module in the OpenCompass environment) if you have one.
OPENCOMPASS_DATASETS: dict[str, OpenCompassDataset] = {
    "math401": OpenCompassDataset("opencompass.configs.datasets.math401.math401_gen", "math401_datasets"),
    "ds1000": OpenCompassDataset("opencompass.configs.datasets.ds1000.ds1000_gen_cbc84f", "ds1000_datasets"),
}


@dataclass(frozen=True)
class OpenCompassModel:
    """One model for OpenCompass to evaluate; `abbr` names its column in the summary."""

    abbr: str
    path: str
    kind: Literal["chat", "base"] = "chat"
    tokenizer_path: str | None = None
    max_out_len: int = 1024
    max_seq_len: int = 4096
    batch_size: int = 8
    num_gpus: int = 1


def transformers4_view(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A copy of a transformers-5 model directory that transformers 4 reads the same way.

    OpenCompass's environment has transformers<5, which (measured with 4.57) silently ignores
    the v5 config key `rope_parameters` (so a model with rope_theta != 10000 would be evaluated
    with the wrong rotary base) and cannot load `"tokenizer_class": "TokenizersBackend"`. The
    view adds `rope_theta`/`rope_scaling` beside `rope_parameters`, names the generic fast
    tokenizer class (inputs: input_ids and attention_mask), and symlinks every other file
    (weights are not copied).
    """
    import json

    src, out = Path(model_dir).resolve(), Path(out_dir)
    if not (src / "config.json").is_file():
        raise TaxfreeError(f"{src}: no config.json (not a model directory)")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = out / f.name
        if f.name in ("config.json", "tokenizer_config.json") or target.exists() or target.is_symlink():
            continue
        target.symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    for cfg in [config, *(v for v in config.values() if isinstance(v, dict) and "model_type" in v)]:
        rope = cfg.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            cfg.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        if "dtype" in cfg and "torch_dtype" not in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    tok_cfg_file = src / "tokenizer_config.json"
    if tok_cfg_file.is_file():
        tok_cfg = json.loads(tok_cfg_file.read_text())
        if tok_cfg.get("tokenizer_class") == "TokenizersBackend":
            tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            # the generic class would also return token_type_ids, which decoder LMs reject
            tok_cfg.setdefault("model_input_names", ["input_ids", "attention_mask"])
        atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")
    return out


def _resolve_dataset(ds: str | OpenCompassDataset) -> OpenCompassDataset:
    if isinstance(ds, OpenCompassDataset):
        if not _MODULE.match(ds.module) or not _PY_IDENT.match(ds.variable):
            raise TaxfreeError(f"opencompass dataset {ds.module}:{ds.variable}: not a module path and a variable name")
        return ds
    if ds not in OPENCOMPASS_DATASETS:
        raise TaxfreeError(
            f"opencompass dataset {ds!r} is not known (known: {', '.join(sorted(OPENCOMPASS_DATASETS))}; "
            "or pass OpenCompassDataset(module, variable))"
        )
    return OPENCOMPASS_DATASETS[ds]


def _check_model(m: OpenCompassModel) -> None:
    if not _ABBR.match(m.abbr):
        raise TaxfreeError(f"opencompass model abbr {m.abbr!r}: use letters, digits, '_', '-', '.'")
    if m.kind not in ("chat", "base"):
        raise TaxfreeError(f"opencompass model {m.abbr}: kind must be 'chat' or 'base', got {m.kind!r}")
    for what, value in (("max_out_len", m.max_out_len), ("max_seq_len", m.max_seq_len),
                        ("batch_size", m.batch_size), ("num_gpus", m.num_gpus)):
        if value < (0 if what == "num_gpus" else 1):
            raise TaxfreeError(f"opencompass model {m.abbr}: {what} must be positive, got {value}")
    looks_local = os.path.isabs(m.path) or m.path.startswith(".") or m.path.count("/") != 1
    if looks_local and not Path(m.path).is_dir():
        raise TaxfreeError(f"opencompass model {m.abbr}: no such model directory: {m.path}")


def render_opencompass_config(
    models: list[OpenCompassModel],
    datasets: list[str | OpenCompassDataset],
    work_dir: str | os.PathLike | None = None,
) -> str:
    """The text of an OpenCompass config evaluating `models` on `datasets`."""
    if not models:
        raise TaxfreeError("opencompass: no models to evaluate")
    if not datasets:
        raise TaxfreeError("opencompass: no datasets to evaluate")
    abbrs = [m.abbr for m in models]
    if len(set(abbrs)) != len(abbrs):
        raise TaxfreeError(f"opencompass: model abbrs must be unique, got {abbrs}")
    for m in models:
        _check_model(m)
    resolved = [_resolve_dataset(d) for d in datasets]
    variables = [d.variable for d in resolved]
    clash = sorted({v for v in variables if variables.count(v) > 1})
    if clash:
        raise TaxfreeError(f"opencompass: two dataset configs export the same name {clash[0]}")

    lines = [
        "# Generated by taxfree (taxfree/eval/opencompass.py); read by `opencompass CONFIG`.",
        "from mmengine.config import read_base",
        "",
        "from opencompass.models import HuggingFaceBaseModel, HuggingFacewithChatTemplate",
        "",
        "with read_base():",
    ]
    for d in resolved:
        lines.append(f"    from {d.module} import {d.variable}  # noqa: F401")
    lines += ["", "datasets = [" + ", ".join(f"*{v}" for v in variables) + "]", "", "models = ["]
    for m in models:
        model_type = "HuggingFacewithChatTemplate" if m.kind == "chat" else "HuggingFaceBaseModel"
        path = str(Path(m.path).resolve()) if Path(m.path).is_dir() else m.path
        tok = m.tokenizer_path or path
        lines += [
            "    dict(",
            f"        type={model_type},",
            f"        abbr={m.abbr!r},",
            f"        path={path!r},",
            f"        tokenizer_path={tok!r},",
            "        model_kwargs=dict(trust_remote_code=False),",
            "        tokenizer_kwargs=dict(trust_remote_code=False),",
            f"        max_out_len={m.max_out_len},",
            f"        max_seq_len={m.max_seq_len},",
            f"        batch_size={m.batch_size},",
            f"        run_cfg=dict(num_gpus={m.num_gpus}),",
            "    ),",
        ]
    lines.append("]")
    if work_dir is not None:
        lines += ["", f"work_dir = {str(Path(work_dir).resolve())!r}"]
    return "\n".join(lines) + "\n"


def write_opencompass_config(
    path: str | os.PathLike,
    models: list[OpenCompassModel],
    datasets: list[str | OpenCompassDataset],
    work_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the config (atomically) and return its path."""
    text = render_opencompass_config(models, datasets, work_dir)
    path = Path(path)
    atomic_write_text(path, text)
    return path


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenCompassRow:
    dataset: str
    version: str
    metric: str
    mode: str
    scores: dict[str, float | None]  # model abbr -> score in percent, None where OpenCompass wrote '-'


def parse_opencompass_summary(csv_path: str | os.PathLike) -> list[OpenCompassRow]:
    """Rows of `summary/summary_<timestamp>.csv` as OpenCompass's DefaultSummarizer writes it."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise TaxfreeError(f"opencompass summary not found: {csv_path}")
    with csv_path.open(encoding="utf-8", newline="") as f:
        table = [row for row in csv.reader(f) if row]
    if not table or table[0][:4] != ["dataset", "version", "metric", "mode"]:
        raise TaxfreeError(f"{csv_path}: not an OpenCompass summary (header must start dataset,version,metric,mode)")
    models = table[0][4:]
    if not models:
        raise TaxfreeError(f"{csv_path}: no model columns")
    rows = []
    for lineno, row in enumerate(table[1:], 2):
        if len(row) != len(table[0]):
            raise TaxfreeError(f"{csv_path}:{lineno}: {len(row)} columns, header has {len(table[0])}")
        scores: dict[str, float | None] = {}
        for model, cell in zip(models, row[4:]):
            if cell.strip() == "-":
                scores[model] = None
                continue
            try:
                scores[model] = float(cell)
            except ValueError:
                raise TaxfreeError(f"{csv_path}:{lineno}: score {cell!r} for {model} is not a number") from None
        rows.append(OpenCompassRow(row[0], row[1], row[2], row[3], scores))
    return rows


def summary_scores(rows: list[OpenCompassRow]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{model abbr: {dataset: {metric: score}}} from parsed summary rows."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for r in rows:
        for model, score in r.scores.items():
            out.setdefault(model, {}).setdefault(r.dataset, {})[r.metric] = score
    return out


def find_run_dir(work_dir: str | os.PathLike, before: set[str] | None = None) -> Path:
    """The newest `<YYYYmmdd_HHMMSS>` run directory in `work_dir` (not among `before`)."""
    work_dir = Path(work_dir)
    runs = sorted(p.name for p in work_dir.iterdir() if p.is_dir() and _TIMESTAMP_RE.match(p.name)) if work_dir.is_dir() else []
    if before is not None:
        runs = [r for r in runs if r not in before]
    if not runs:
        raise TaxfreeError(f"opencompass wrote no run directory under {work_dir}")
    return work_dir / runs[-1]


def find_summary_csv(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    found = sorted((run_dir / "summary").glob("summary_*.csv"))
    if not found:
        raise TaxfreeError(f"opencompass wrote no summary CSV under {run_dir / 'summary'}")
    return found[-1]


def task_logs(run_dir: str | os.PathLike, model: str, dataset: str) -> list[Path]:
    """Log files OpenCompass's runner wrote for one (model, dataset), inference before evaluation."""
    run_dir = Path(run_dir)
    logs: list[Path] = []
    for stage in ("infer", "eval"):
        d = run_dir / "logs" / stage / model
        if d.is_dir():
            # a partitioned dataset logs as <dataset>_<k>.out
            logs += sorted(p for p in d.glob(f"{dataset}*.out") if p.stem == dataset or p.stem.startswith(dataset + "_"))
    return logs


def failing_log(run_dir: str | os.PathLike, model: str, dataset: str) -> Path:
    """The log to read first for a missing score: the first one with a traceback or error."""
    logs = task_logs(run_dir, model, dataset)
    for log in logs:
        text = log.read_text(encoding="utf-8", errors="replace")
        if "Traceback" in text or "Error" in text:
            return log
    return logs[-1] if logs else Path(run_dir) / "logs"


def collect_opencompass_results(run_dir: str | os.PathLike) -> dict[str, dict[str, dict[str, float]]]:
    """Scores of one finished run; any '-' raises TaxfreeError naming the task's log."""
    run_dir = Path(run_dir)
    rows = parse_opencompass_summary(find_summary_csv(run_dir))
    for r in rows:
        for model, score in r.scores.items():
            if score is None:
                log = failing_log(run_dir, model, r.dataset)
                raise TaxfreeError(f"opencompass: no score for {r.dataset} on {model}; see {log}")
    return summary_scores(rows)  # type: ignore[return-value]


def opencompass_executable(venv: str | os.PathLike | None = None) -> Path:
    """`<venv>/bin/opencompass`; venv defaults to $TAXFREE_OPENCOMPASS_VENV or .opencompass-venv."""
    venv = Path(venv or os.environ.get("TAXFREE_OPENCOMPASS_VENV", DEFAULT_OPENCOMPASS_VENV))
    exe = venv / "bin" / "opencompass"
    if not exe.is_file():
        raise TaxfreeError(f"opencompass is not installed at {exe}: run `make opencompass-env`")
    return exe


def run_opencompass(
    config_path: str | os.PathLike,
    work_dir: str | os.PathLike,
    executable: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    max_num_workers: int = 1,
    timeout_s: float | None = None,
    extra_args: tuple[str, ...] = (),
) -> dict[str, dict[str, dict[str, float]]]:
    """Run OpenCompass on a config and return `{model abbr: {dataset: {metric: score}}}`.

    `data_dir` becomes `COMPASS_DATA_CACHE` (where OpenCompass looks for `./data/<dataset>`).
    The driver's own output goes to `WORK_DIR/opencompass_driver.log`; a failure raises
    `TaxfreeError` naming that log or the failing task's log.
    """
    config_path = Path(config_path).resolve()
    if not config_path.is_file():
        raise TaxfreeError(f"opencompass config not found: {config_path}")
    exe = Path(executable) if executable is not None else opencompass_executable()
    if not exe.is_file():
        raise TaxfreeError(f"opencompass executable not found: {exe}")
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in work_dir.iterdir()}
    cmd = [str(exe), str(config_path), "--work-dir", str(work_dir), "--max-num-workers", str(max_num_workers), *extra_args]
    env = dict(os.environ)
    if data_dir is not None:
        env["COMPASS_DATA_CACHE"] = str(Path(data_dir).resolve())
    driver_log = work_dir / "opencompass_driver.log"
    with driver_log.open("w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work_dir, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise TaxfreeError(f"opencompass timed out after {timeout_s} s; see {driver_log}") from None
        except OSError as e:
            raise TaxfreeError(f"opencompass could not start ({e.strerror}); see {exe}") from None
    if proc.returncode != 0:
        raise TaxfreeError(f"opencompass failed (exit {proc.returncode}); see {driver_log}")
    try:
        run_dir = find_run_dir(work_dir, before)
        find_summary_csv(run_dir)
    except TaxfreeError as e:
        raise TaxfreeError(f"{e}; see {driver_log}") from None
    return collect_opencompass_results(run_dir)
