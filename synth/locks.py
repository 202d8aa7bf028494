"""One writer at a time: an exclusive lock on a file that the operating system drops when its holder
dies (``flock``: a SIGKILLed holder leaves no stale lock behind).

Used by ``synth generate`` (one run per output folder) and ``harness sweep`` (one driver per
experiment and tracking store on a machine), which refuse a second holder; and by ``waiting`` and
``build_once`` (the packaged model's conversion, an MNTP adapter), where a second process waits and
then uses the result. The lock file records who holds it, so a refusal names the running one.
Drivers on other machines sharing a remote store are not seen by a local lock (see README,
"Reliability").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class LockedError(RuntimeError):
    """Another process holds the lock; the message names it."""


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, or raise :class:`LockedError` at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            raise LockedError(
                f"{what} is already running ({holder}); wait for it to end or stop it"
            ) from None
        stamp = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp.encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_HELD: set[Path] = set()  # the paths this process holds through ``waiting``


@contextlib.contextmanager
def waiting(path: Path, on_wait: Callable[[str], None] = lambda _: None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, waiting while another process holds it
    (``on_wait`` gets its holder, once). Re-entrant within a process: a nested hold of the same
    path does not wait for itself."""
    path = path.resolve()
    if path in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process")
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while the other one builds
        stamp = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp.encode(), 0)
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def build_once(lock: Path, ready: Callable[[], bool], build: Callable[[], None]) -> bool:
    """Run ``build`` unless ``ready()``; concurrent callers (Ray workers on one machine) wait for
    the one that builds instead of building too. Returns whether this call built."""
    if ready():
        return False
    with waiting(lock):
        if ready():  # built while we waited
            return False
        build()
        return True
