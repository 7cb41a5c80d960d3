"""`python tests/helpers_launch_probe.py ARGS...` = `python -m taxfree ARGS...`, recording every atomic
write (files: manifests, started markers, JSON; directories: models) with the rank that made it.

Used by tests/test_multiprocess_stages.py and tests/test_multiprocess_deepspeed_stages.py under
`accelerate launch`: the log shows whether only the main process writes results. Records go to
$TAXFREE_PROBE_LOG, one JSON object a line.

With $TAXFREE_PROBE_TRAIN_LOG set, every rank also logs there, after each `Trainer.train()`, what
trained (op "train"): the accelerate distributed type, the DeepSpeed engine and ZeRO stage if any,
the chain of optimizer wrappers down to the one that stepped (accelerate's wrapper, DeepSpeed's
ZeRO optimizer, ours), and for an online merging optimizer its step count and how many entries its
param groups hold on this rank (under ZeRO: this rank's flat partitions; otherwise the model's
tensors).

A write attempted by a rank other than 0 is logged and then dropped (a file is not written; a
directory is built in a scratch place and thrown away), so what lands in the run directory is
rank 0's alone and the training results can be checked deterministically; whether other ranks
tried to write at all is what the log is for.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

import taxfree.atomic as atomic

LOG = os.environ["TAXFREE_PROBE_LOG"]
TRAIN_LOG = os.environ.get("TAXFREE_PROBE_TRAIN_LOG")


def _rank() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _record(op: str, path) -> bool:
    """Log the write; True when it may happen (rank 0), False when it is dropped."""
    rank, world = _rank()
    line = json.dumps({"op": op, "path": os.path.abspath(str(path)), "rank": rank, "world": world, "pid": os.getpid()})
    with open(LOG, "a", encoding="utf-8") as f:  # O_APPEND: lines of both processes stay whole
        f.write(line + "\n")
    return rank == 0


_write_bytes = atomic.atomic_write_bytes
_dir = atomic.atomic_dir


def atomic_write_bytes(path, data):
    if _record("file", path):
        return _write_bytes(path, data)
    return None


@contextlib.contextmanager
def _scratch_dir():
    tmp = tempfile.mkdtemp(prefix="probe-dropped-")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_dir(final, overwrite=False):
    if _record("dir", final):
        return _dir(final, overwrite=overwrite)
    return _scratch_dir()


def _training_record(trainer) -> dict:
    chain, opt = [], trainer.optimizer
    while opt is not None and len(chain) < 8:
        chain.append(type(opt).__name__)
        inner = opt
        opt = getattr(opt, "optimizer", None)
    record = {"op": "train", "output_dir": os.path.abspath(trainer.args.output_dir), "optimizers": chain,
              "distributed_type": str(trainer.accelerator.distributed_type),
              "engine": type(trainer.model_wrapped).__name__, "zero_stage": None, "group_steps": None,
              "held": None, "tau_held": None, "partitions": None}
    if hasattr(trainer.model_wrapped, "zero_optimization_stage"):
        record["zero_stage"] = trainer.model_wrapped.zero_optimization_stage()
    if chain and hasattr(inner, "tau_dense"):  # an online merging optimizer: what it stepped on
        record["group_steps"] = [g["group_step"] for g in inner.param_groups]
        # ZeRO partitions it stepped on (ZeRO-3 empties the param groups between steps), else the tensors
        record["partitions"] = len(inner._layouts)
        held = list(inner._layouts) or [p for g in inner.param_groups for p in g["params"]]
        record["held"] = sum(p.numel() for p in held)
        record["tau_held"] = sum(inner.tau_dense(p).numel() for p in held)
    record["parameters"] = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad)
    return record


def _patch_trainer() -> None:
    from transformers import Trainer

    train = Trainer.train

    def logged_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        rank, world = _rank()
        line = json.dumps({**_training_record(self), "rank": rank, "world": world, "pid": os.getpid()})
        with open(TRAIN_LOG, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        return result

    Trainer.train = logged_train


# Patched before any taxfree module binds the names (`from taxfree.atomic import atomic_dir`).
atomic.atomic_write_bytes = atomic_write_bytes
atomic.atomic_dir = atomic_dir

if __name__ == "__main__":
    if TRAIN_LOG:
        _patch_trainer()
    sys.argv = ["taxfree", *sys.argv[1:]]
    runpy.run_module("taxfree", run_name="__main__", alter_sys=True)
