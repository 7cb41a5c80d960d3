"""`python tests/helpers_launch_probe.py ARGS...` = `python -m taxfree ARGS...`, recording every atomic
write (files: manifests, started markers, JSON; directories: models) with the rank that made it.

Used by tests/test_multiprocess_stages.py under `accelerate launch`: the log shows whether only the
main process writes results. Records go to $TAXFREE_PROBE_LOG, one JSON object a line.

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


# Patched before any taxfree module binds the names (`from taxfree.atomic import atomic_dir`).
atomic.atomic_write_bytes = atomic_write_bytes
atomic.atomic_dir = atomic_dir

if __name__ == "__main__":
    sys.argv = ["taxfree", *sys.argv[1:]]
    runpy.run_module("taxfree", run_name="__main__", alter_sys=True)
