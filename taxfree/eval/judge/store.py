"""Append-only JSONL stores: the judge's cache of answers and judgements, safe to kill.

Each finished call is one line, written with one `write` and fsynced before the call counts as
done, so a killed evaluate loses at most the calls in flight. A line cut short by the kill is
dropped when the store is opened again (the file is truncated to its last complete line before
anything is appended), and a later line for the same key wins. Threads share a store through
its lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from taxfree.errors import TaxfreeError, disk_full_error, is_disk_full


def cache_key(parts: dict) -> str:
    """sha256 of the parts as canonical JSON: the same inputs give the same key in any process."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class JsonlStore:
    """{key: entry} backed by `path`; `add` appends and syncs."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.entries: dict[str, dict] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut short by a kill: drop it before appending after it
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for lineno, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise TaxfreeError(f"{self.path}:{lineno}: not a JSON line (delete the file to start the cache over)") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                raise TaxfreeError(f"{self.path}:{lineno}: a cache entry needs a string 'key'")
            self.entries[entry["key"]] = entry

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: dict) -> None:
        line = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                if is_disk_full(e):
                    raise disk_full_error(e, str(self.path), kept=str(self.path)) from None
                raise
            self.entries[entry["key"]] = entry
