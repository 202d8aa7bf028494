"""``harness ui``: the MLflow UI for one store, on loopback unless told otherwise, started in its
own process group so that stopping it (Ctrl-C, SIGTERM) stops its server workers too."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness.tracking import resolve_uri
from synth.processes import stop_group


def ui_command(uri: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """``mlflow ui`` for one store, small: one worker, no job-execution processes (3.3 GB -> 0.5 GB)."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--host", host, "--port", str(port), "--workers", "1"]  # fmt: skip


class UIError(RuntimeError):
    """The MLflow UI could not be started."""


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on: ``mlflow ui`` would exit there while the other
    server answers ``/health``, so the URL would show another store."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as the server will bind: a port in TIME_WAIT after a stopped UI is free, a listener is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UIError(
                    f"port {port} on {host} is already in use (another MLflow UI or server?): "
                    "stop it or choose another --port"
                ) from None
            raise UIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def start_ui(
    uri: str, port: int, host: str = "127.0.0.1", timeout: float = 180.0
) -> subprocess.Popen[bytes]:
    """Start the MLflow UI and return once ``/health`` answers (the caller stops the process)."""
    check_port_free(host, port)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # its own process group: stopping it stops the server workers it forks too
    proc = subprocess.Popen(
        ui_command(resolve_uri(uri), port, host),
        env=env,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UIError(f"mlflow ui exited with code {proc.returncode} (is port {port} taken?)")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
                # ours only while it runs: a server that took the port since the check answers too
                if r.status == 200 and proc.poll() is None:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_ui(proc)
    raise UIError(
        f"mlflow ui did not answer on http://{host}:{port} within {timeout:.0f} s "
        "(a loaded machine starts it slowly: raise --timeout)"
    )


def stop_ui(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop the UI and every process of its group (SIGTERM, then SIGKILL after ``timeout``), and
    return once the group is empty."""
    stop_group(proc, grace_s=timeout)


def serve_ui(
    exp_path_or_uri: str | os.PathLike[str],
    port: int = 5000,
    host: str = "127.0.0.1",
    timeout: float = 180.0,
) -> None:
    """``harness ui``: serve the store of an experiment file (or a tracking URI) until Ctrl-C."""
    target = str(exp_path_or_uri)
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        from harness.experiment_file import load_experiment

        target = load_experiment(target).tracking.uri
    if target.startswith("sqlite:///"):
        store = Path(target[len("sqlite:///") :]).expanduser()
        if not store.is_file():  # mlflow would create an empty store there
            raise UIError(
                f"no MLflow store at {store.resolve()} (run a sweep first, or give the store's URI)"
            )
    check_port_free(host, port)  # before a URL is printed: it would show another server
    print(
        f"starting the MLflow UI for {resolve_uri(target)} on http://{host}:{port} ...", flush=True
    )
    proc = start_ui(target, port, host, timeout=timeout)
    print(
        f"MLflow UI for {resolve_uri(target)}: http://{host}:{port}  (Ctrl-C to stop)", flush=True
    )

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)  # `kill` stops the UI like Ctrl-C does
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        stop_ui(proc)
        signal.signal(signal.SIGTERM, previous)
    if code:  # it died on its own: the URL printed above no longer serves this store
        raise UIError(f"mlflow ui on port {port} exited with code {code}")
