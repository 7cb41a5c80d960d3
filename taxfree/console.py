"""The pipeline's one line of progress text: `[taxfree] ...` on stderr, flushed at once so it
interleaves correctly with the trainers' bars and with other ranks' output."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(f"[taxfree] {msg}", file=sys.stderr, flush=True)
