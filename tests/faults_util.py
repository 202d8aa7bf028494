"""Helpers of the fault suite (``pytest -m faults``): a planted secret and a search of everything a
run wrote, listening sockets of a process tree, and the "clean failure" contract of the CLIs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import psutil

# Not shaped like any known key (no sk-/hf_ prefix), so only exact redaction can keep it out.
PLANTED_KEY = "nm-planted-secret-8c2e41f0d9b7a6e5"


def files_under(*roots: Path) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        if root.is_file():
            out.append(root)
        elif root.is_dir():
            out += [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return sorted(out)


def assert_secret_absent(secret: str, roots: Iterable[Path], texts: Iterable[str] = ()) -> int:
    """No file under ``roots`` (read as bytes: SQLite pages, parquet, logs) and no text holds
    ``secret``; return how many files and texts were searched (at least one must exist)."""
    needle = secret.encode()
    files = files_under(*roots)
    assert files, f"nothing written under {list(roots)}"
    leaks = [str(p) for p in files if needle in p.read_bytes()]
    texts = list(texts)
    leaks += [f"text #{i}" for i, t in enumerate(texts) if secret in t]
    assert not leaks, f"the secret was written to: {leaks}"
    return len(files) + len(texts)


def listen_addresses(pid: int) -> set[str]:
    """IP addresses the process and its children listen on (TCP)."""
    proc = psutil.Process(pid)
    found: set[str] = set()
    for p in [proc, *proc.children(recursive=True)]:
        try:
            found |= {
                c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN
            }
        except psutil.NoSuchProcess:
            continue
    return found


def assert_clean_failure(exit_code: int, output: str, *fragments: str) -> None:
    """A user error: exit code 2, an ``error:`` line naming every fragment, and no traceback."""
    assert exit_code == 2, f"exit code {exit_code}: {output[-2000:]}"
    assert "error:" in output and "Traceback" not in output, output[-2000:]
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in: {output[-2000:]}"


def env_with(**values: str) -> dict[str, str]:
    """This process's environment with ``values`` added (for subprocesses)."""
    return {**os.environ, **values}
