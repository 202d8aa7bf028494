"""The Ray cluster a sweep runs on: join one (``--address``) or start a local one, fail fast when
the address points nowhere, and how many trials fit on its live nodes."""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any


class ClusterError(RuntimeError):
    """No Ray cluster at the given address; the message says what to do."""


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when ``--address`` points nowhere."""
    if address in ("auto", "local"):
        return
    hostport = re.sub(r"^\w+://", "", address)
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"--address {address!r}: expected HOST:PORT (the address `ray start --head` printed)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({e}); start it with `ray start --head` "
            "on the head node, or leave --address out to run on this machine"
        ) from None


@contextmanager
def ray_session(address: str | None, runtime_env: dict[str, Any] | None = None) -> Iterator[None]:
    """Join ``address`` or start a local Ray; reuse a connection the caller already made."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        check_reachable(address)
        if address not in ("auto", "local"):
            # Ray Train's helper actors call ray.init() without an address; on a machine that runs
            # more than one Ray cluster that picks the newest, which may not be this one
            env = dict((runtime_env or {}).get("env_vars", {}), RAY_ADDRESS=address)
            runtime_env = {**(runtime_env or {}), "env_vars": env}
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env=runtime_env,
    )
    try:
        yield
    finally:
        ray.shutdown()


def cluster_capacity(per_trial: Mapping[str, float], workers: int = 1) -> int:
    """How many trials of ``workers`` workers of ``per_trial`` resources fit at once on the live
    nodes (a worker's resources come from one node; a trial's workers may span nodes)."""
    import ray

    total = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fits = [math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in per_trial.items() if v > 0]
        total += min(fits) if fits else 0
    return total // workers
