"""Stopping a process group we started, all of it.

Every long-lived helper process the project starts (``transformers serve``, ``mlflow ui``) runs in
a process group of its own (``start_new_session=True``) so that stopping it also stops what it
forked. Waiting for the group's *leader* is not enough: the leader may exit on SIGTERM while a
child is still finishing (a generation in progress, a server worker draining), and a leader that is
already gone says nothing about the rest of its group. So we signal the *group* and wait until the
group itself is empty: ``killpg(pgid, 0)`` raises ``ProcessLookupError`` only once no member is
left, zombies included (an orphan is reaped by init, which may take a moment; our own leader is
reaped by ``Popen.poll``).

``synth`` never imports ``harness``; ``harness/ui.py`` uses this module too, so it lives here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

_POLL_S = 0.05


def group_alive(pgid: int) -> bool:
    """Whether any process (zombies included) is still in the process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal is still a member
        return True
    return True


def _signal(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_empty(procs: Sequence[subprocess.Popen], deadline: float) -> bool:
    """Reap our leaders and wait until every group is empty or ``deadline`` passes."""
    while True:
        for proc in procs:
            proc.poll()  # reap the leader: an unreaped leader keeps its group alive
        if not any(group_alive(proc.pid) for proc in procs):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def stop_groups(
    procs: Sequence[subprocess.Popen], grace_s: float = 5.0, kill_wait_s: float = 10.0
) -> bool:
    """Stop the process groups led by ``procs`` (each started with ``start_new_session=True``).

    SIGTERM every group at once, wait up to ``grace_s`` for all their members to exit, SIGKILL
    whatever is left, then wait up to ``kill_wait_s`` for the groups to be empty. A group whose
    leader has already exited is still signalled: its other members may be alive.

    Args:
        procs: the group leaders, as returned by ``subprocess.Popen``.
        grace_s: how long the processes get to shut down cleanly after SIGTERM.
        kill_wait_s: how long to wait after SIGKILL (bounded: a process in uninterruptible sleep,
            or an orphan zombie that init has not reaped yet, can outlive a SIGKILL for a while).

    Returns:
        True when every group is empty, False when a member was still there at the end.
    """
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_wait_s)):
        for proc in procs:
            _signal(proc.pid, sig)
        if _wait_empty(procs, time.monotonic() + wait):
            return True
    return False


def stop_group(proc: subprocess.Popen, grace_s: float = 5.0, kill_wait_s: float = 10.0) -> bool:
    """:func:`stop_groups` for one group."""
    return stop_groups([proc], grace_s=grace_s, kill_wait_s=kill_wait_s)


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM (`kill`, a scheduler's stop) does what Ctrl-C does: it calls the
    current SIGINT handler (Python's raises KeyboardInterrupt; Ray Tune's stops the run gracefully),
    so ``finally`` blocks and handlers that mark runs KILLED run. Without it the process dies at
    once (Python's default) or, after ``ray.init``, Ray's handler exits mid-loop with a C++ stack
    dump; either way MLflow runs stay RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (and only it gets signals)
        return

    def on_term(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIGINT ignored: still stop
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
