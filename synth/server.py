"""Start and stop a local OpenAI-compatible server (``transformers serve``) for a local model.

The server runs in its own process group so stopping it (at the end, on an error, on Ctrl-C) takes
every process it spawned with it: no orphan keeps the port or the memory. Readiness is ``GET /health``:
with a forced model, ``transformers serve`` loads it before it listens, so a healthy server can
answer. (Not a tiny chat request: with continuous batching the first chat request fixes the sampling
settings for the server's lifetime. Not ``GET /v1/models``: it answers 500 without a Hub cache.)
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from synth.packaged import resolve
from synth.processes import stop_group
from synth.synth_config import LocalServer

_PR_SET_PDEATHSIG = 1
log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The local server did not start or died; the message carries the end of its log."""


@dataclass(frozen=True)
class RunningServer:
    base_url: str  # ends in /v1
    model: str  # the name requests must use
    pid: int
    log: Path

    def sampling_body(self, temperature: float, top_p: float) -> dict[str, str]:
        """``transformers serve`` samples only if the model's generation config says so; most local
        folders say greedy, which would make every answer to the same prompt identical. Its
        ``generation_config`` body field replaces the model's config, so send the model's own
        (EOS, pad ids) with sampling switched on."""
        path = Path(self.model) / "generation_config.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        config.pop("transformers_version", None)
        config.update(do_sample=temperature > 0, temperature=temperature, top_p=top_p)
        return {"generation_config": json.dumps(config)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(settings: LocalServer, model_dir: str, port: int) -> list[str]:
    # The `transformers` console script lives next to this interpreter in a virtualenv.
    exe = Path(sys.executable).with_name("transformers")
    cmd = [
        str(exe) if exe.is_file() else "transformers",
        "serve",
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        settings.device,
    ]
    if settings.continuous_batching:
        cmd.append("--continuous-batching")
    return cmd + list(settings.extra_args)


def _die_with_parent() -> None:
    """In the server process (Linux): get SIGKILL when the parent dies, even by SIGKILL, so a
    killed ``synth generate`` leaves no orphan server holding the port and the memory."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def _ready(root_url: str) -> bool:
    try:
        return httpx.get(f"{root_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def stop(process: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM the server's whole process group, SIGKILL what is left after ``grace_s`` (uvicorn
    waits for a generation in progress, which on a CPU can take minutes), and return once the
    group is empty: the leader's exit alone says nothing about the children it forked."""
    if not stop_group(process, grace_s=grace_s):
        log.warning("transformers serve (process group %d) outlived SIGKILL", process.pid)


@contextmanager
def local_server(settings: LocalServer, log_dir: Path | None = None) -> Iterator[RunningServer]:
    """Serve ``settings.model`` on a free loopback port until the block exits (however it exits)."""
    model_dir = resolve(settings.model)
    if not Path(model_dir, "config.json").is_file():
        raise ServerError(f"{settings.model}: {model_dir} is not a local transformers model folder")
    port = free_port()
    log_dir = log_dir or Path(tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"transformers-serve-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command(settings, model_dir, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        root_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + settings.startup_timeout_s
        while not _ready(root_url):
            if process.poll() is not None:
                raise ServerError(
                    f"transformers serve exited with {process.returncode}; log {log}:\n{_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise ServerError(
                    f"transformers serve not ready after {settings.startup_timeout_s:.0f}s; log {log}:\n{_tail(log)}"
                )
            time.sleep(0.5)
        yield RunningServer(base_url=f"{root_url}/v1", model=model_dir, pid=process.pid, log=log)
    finally:
        stop(process)
