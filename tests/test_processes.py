"""Stopping a process group stops all of it (``synth/processes.py``), for the local synthesis
server and the MLflow UI alike.

The groups here are real processes on this machine. What they do on SIGTERM is scripted, because
the fault under test, a child that outlives its group's leader for a moment (``transformers serve``
draining a generation; a uvicorn worker finishing a request), is not something the real servers do
on demand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.ui import stop_ui
from synth import server
from synth.processes import group_alive, stop_group
from synth.synth_config import LocalServer

# A child that ignores SIGTERM for a moment and then exits, as a server draining its work does.
_STUBBORN_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: None)
    open(sys.argv[1], "w").close()  # "I am up, and deaf to SIGTERM"
    time.sleep(float(sys.argv[2]))
    """
)

# A leader that forks the stubborn child and exits at once on SIGTERM.
_LEADER = textwrap.dedent(
    """
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
    time.sleep(600)
    """
)


def _group(tmp_path: Path, child_s: float) -> subprocess.Popen[bytes]:
    """A real process group: a leader and a child that ignores SIGTERM for ``child_s`` seconds."""
    ready = tmp_path / "child-ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LEADER, _STUBBORN_CHILD, str(ready), str(child_s)],
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("stopper", ["server", "ui"])
def test_stop_waits_for_a_child_that_outlives_the_leader(tmp_path, stopper):
    """Fails before the fix: stop() returned as soon as the leader exited, the child still alive."""
    proc = _group(tmp_path, child_s=1.5)
    if stopper == "server":
        server.stop(proc, grace_s=30)
    else:
        stop_ui(proc, timeout=30)
    assert proc.poll() is not None
    assert not group_alive(proc.pid)


def test_stop_when_the_leader_is_already_gone(tmp_path):
    """Fails before the fix: stop() returned at once because the leader had exited."""
    proc = _group(tmp_path, child_s=600)
    proc.terminate()  # the leader alone
    proc.wait(30)
    assert group_alive(proc.pid)  # its child lives on in the group
    server.stop(proc, grace_s=0.5)
    assert not group_alive(proc.pid)


def test_sigkill_after_the_grace_period(tmp_path):
    """A child deaf to SIGTERM for 10 minutes is killed after the grace period, well before."""
    proc = _group(tmp_path, child_s=600)
    t0 = time.monotonic()
    assert stop_group(proc, grace_s=0.5, kill_wait_s=30)
    assert not group_alive(proc.pid)
    assert time.monotonic() - t0 < 30


def test_an_empty_group_returns_at_once():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait(30)
    t0 = time.monotonic()
    assert stop_group(proc, grace_s=30)
    assert time.monotonic() - t0 < 5


_STANDIN_SERVE = textwrap.dedent(
    """
    # Stand-in for `transformers serve`: answers /health, forks a worker that is deaf to SIGTERM
    # for a moment, and exits at once on SIGTERM (the leader-first shutdown of issue 34).
    import http.server, subprocess, sys
    port, child, ready = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    subprocess.Popen([sys.executable, "-c", child, ready, "1.5"])

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
    """
)


def test_local_server_leaves_no_process_behind(tmp_path, monkeypatch):
    """``local_server`` through its real start, readiness and stop, with a stand-in server."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ready = tmp_path / "worker-ready"

    def standin(settings, model_dir, port):
        return [sys.executable, "-c", _STANDIN_SERVE, str(port), _STUBBORN_CHILD, str(ready)]

    monkeypatch.setattr(server, "command", standin)
    settings = LocalServer(model=str(model), continuous_batching=False, startup_timeout_s=60)
    with server.local_server(settings, log_dir=tmp_path) as running:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline, "the stand-in's worker did not start"
            time.sleep(0.05)
        pgid = running.pid
    with pytest.raises(ProcessLookupError):  # the whole group, the worker included, is gone
        os.killpg(pgid, 0)


def test_a_zombie_driver_is_gone():
    """A sweep driver that died but is not reaped yet (a zombie) answers ``kill(pid, 0)`` like a
    live one; its RUNNING runs are still a dead driver's (fails before: it counted as alive)."""
    import socket

    from harness.tracking import DRIVER, driver_gone

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().split(") ", 1)[1][0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.05)
    try:
        assert driver_gone({DRIVER: f"{socket.gethostname()}:{proc.pid}"})
        assert not driver_gone({DRIVER: f"{socket.gethostname()}:{os.getpid()}"})
    finally:
        proc.wait()
