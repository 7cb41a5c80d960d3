"""Benchmarks through lm-eval's Python API, returned as plain numbers.

The alignment tax is a drop in benchmark scores, so the benchmarks must be the field's own:
lm-evaluation-harness runs them (`lm_eval.simple_evaluate`), on a model object already in
memory (no save/reload between stages) or on a model directory. Local jsonl tasks written by
`taxfree.eval.local_tasks.write_local_tasks` come in through `include_path`.

The result is flattened to `{task: {metric: value}}`: lm-eval's key `"acc,none"` becomes `"acc"`
and a filtered metric keeps its filter (`"exact_match,strict-match"`); standard errors, when
computed, are kept as `"<metric>_stderr"`. Groups (e.g. `mmlu`) appear as their own entry next to their subtasks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from taxfree.errors import TaxfreeError, nearest

log = logging.getLogger(__name__)


def flatten_lm_eval_results(raw_results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`results["results"]` of lm-eval -> {task: {metric: float}}; non-numeric entries dropped."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in raw_results.items():
        flat: dict[str, float] = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # lm-eval writes "N/A" for stderrs it did not compute
            metric, _, filt = key.partition(",")
            flat[metric if filt == "none" else f"{metric},{filt}"] = float(value)
        out[task] = flat
    return out


def _task_manager(tasks: list[str], include_path: str | None):
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise TaxfreeError(f"lm-eval include_path: no such directory: {include_path}")
        # Indexing the ~12k built-in YAMLs takes seconds: skip them when the local tasks suffice.
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = [f"{t}{nearest(t, manager.all_tasks)}" for t in unknown]
        raise TaxfreeError(f"lm-eval: unknown task(s): {', '.join(hints)}")
    return manager


def run_lm_eval(
    model_or_dir,
    tokenizer=None,
    tasks: list[str] | tuple[str, ...] = (),
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    allow_code_execution: bool = False,
    apply_chat_template: bool = False,
    max_length: int | None = None,
    dtype: str = "auto",
    seed: int = 1234,
    bootstrap_iters: int = 0,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on a model and return `{task: {metric: value}}`.

    `model_or_dir`: a `transformers.PreTrainedModel` (used where it is; `tokenizer` required)
    or a model directory / hub id (loaded by lm-eval on `device` with `dtype`).
    `allow_code_execution` must be set for tasks that execute model-written code (HumanEval,
    MBPP); it also sets `HF_ALLOW_CODE_EVAL=1`, which their metric requires.
    `bootstrap_iters=0` (the default, fast) makes lm-eval skip standard errors altogether; pass
    e.g. 100000 to get `<metric>_stderr` entries.
    """
    tasks = list(tasks)
    if not tasks:
        raise TaxfreeError("run_lm_eval: no tasks given")
    if batch_size < 1:
        raise TaxfreeError(f"run_lm_eval: batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit <= 0:
        raise TaxfreeError(f"run_lm_eval: limit must be positive, got {limit}")

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from_disk = isinstance(model_or_dir, (str, os.PathLike))
    if from_disk:
        pretrained = str(model_or_dir)
        if (os.path.sep in pretrained or pretrained.startswith(".")) and not Path(pretrained).is_dir():
            raise TaxfreeError(f"lm-eval: model directory not found: {pretrained}")
    elif tokenizer is None:
        raise TaxfreeError("run_lm_eval: an in-memory model needs its tokenizer")

    include = str(include_path) if include_path is not None else None
    manager = _task_manager(tasks, include)

    if from_disk:
        lm = HFLM(
            pretrained=pretrained,
            tokenizer=tokenizer,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            max_length=max_length,
            trust_remote_code=False,
        )
    else:
        was_training = model_or_dir.training  # HFLM switches the model to eval mode; give it back as it was
        lm = HFLM(pretrained=model_or_dir, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)

    env_before = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # the code_eval metric refuses to run without it
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            apply_chat_template=apply_chat_template,
            confirm_run_unsafe_code=allow_code_execution,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except ValueError as e:
        if "marked as unsafe" in str(e):
            raise TaxfreeError(
                f"lm-eval: {e.args[0].split(' which ')[0].replace('Attempted to run task: ', 'task ')} "
                "executes model-written code: set allow_code_execution (and run it in a sandbox)"
            ) from None
        raise
    finally:
        if not from_disk:
            model_or_dir.train(was_training)
        if allow_code_execution:
            if env_before is None:
                os.environ.pop("HF_ALLOW_CODE_EVAL", None)
            else:
                os.environ["HF_ALLOW_CODE_EVAL"] = env_before
    if results is None:  # non-zero rank under accelerate: the main process reports
        return {}
    return flatten_lm_eval_results(results["results"])
