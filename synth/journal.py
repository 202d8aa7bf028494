"""An append-only JSON-lines journal of finished requests: what makes synthesis resumable.

Each answer is appended, flushed and fsynced as soon as it arrives, keyed by a deterministic request
key, so a rerun after a kill at any moment skips exactly the requests already answered. A kill in
the middle of a write leaves a torn last line: reading ignores it and opening for append cuts it
off first, so the next record starts on a line of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, dict[str, Any]]:
        """Finished records by key (a torn or unreadable line is skipped, not fatal)."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return records
        with self.path.open("rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(record, dict) and isinstance(record.get("key"), str):
                    records.setdefault(record["key"], record)
        return records

    def open(self) -> JournalWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path)
        return JournalWriter(self.path)


def _cut_torn_tail(path: Path) -> None:
    """Truncate anything after the last newline (a record killed mid-write)."""
    if not path.is_file():
        return
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            step = min(65536, end)
            f.seek(end - step)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                end = end - step + nl + 1
                break
            end -= step
        if end != size:
            f.truncate(end)


class JournalWriter:
    def __init__(self, path: Path) -> None:
        self._file = path.open("ab")

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
