"""An append-only JSON-lines journal of finished requests: what makes synthesis resumable.

Each answer is appended and flushed to the operating system as soon as it arrives, keyed by a
deterministic request key, so a rerun after a kill of the process at any moment (SIGKILL included)
skips exactly the requests already answered. ``fsync`` (which only matters if the machine itself
crashes) is grouped: at most once per ``sync_interval`` seconds and on close. Syncing every answer
cost ~4 ms on the event loop's thread and stalled every request in flight (bench/synth_concurrency.py). A kill in
the middle of a write leaves a torn last line: reading ignores it and opening for append cuts it
off first, so the next record starts on a line of its own.
"""

from __future__ import annotations

import json
import os
import time
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

    def open(self, sync_interval: float = 1.0) -> JournalWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path)
        return JournalWriter(self.path, sync_interval)


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
    def __init__(self, path: Path, sync_interval: float = 1.0) -> None:
        self._file = path.open("ab")
        self._sync_interval = sync_interval
        self._synced_at = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self._file.flush()  # in the OS now: a killed process loses nothing
        if time.monotonic() - self._synced_at >= self._sync_interval:
            self.sync()

    def sync(self) -> None:
        """Force the journal to disk (survives a crash of the machine, not just of the process)."""
        os.fsync(self._file.fileno())
        self._synced_at = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
