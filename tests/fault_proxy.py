"""A fault-injecting HTTP proxy on loopback (aiohttp), put in front of an OpenAI-compatible server.

Each request gets one fault from a :class:`FaultPlan` (scripted in arrival order, then drawn at
random with a seed), and the proxy does it for real on the socket: it drops the connection, cuts
the answer off mid-body, holds the request past the client's timeout, drip-feeds the body a few bytes
at a time (each read within the timeout, the whole far past it), answers slowly, answers 429
with ``Retry-After`` or 5xx, or passes the real answer through with its body damaged (not JSON,
non-UTF-8 bytes, a lone surrogate, a huge answer, fields missing or of the wrong type). Every
request's arrival time, prompt seed and fault are recorded for the assertions.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

# Faults at the transport and HTTP level: the client should retry them.
TRANSPORT_FAULTS = ("drop", "cut", "hang", "drip", "429", "500", "503")
FATAL_FAULTS = ("401",)  # a bad key: the run stops at once
# Faults in a 200 answer's body: the client should fail or reject that one answer, never crash.
BODY_FAULTS = (
    "not_json",
    "non_utf8",
    "surrogate",
    "huge",
    "no_choices",
    "content_number",
    "content_list",
    "usage_strings",
    "no_usage",
    "bare_content",
)
RETRY_AFTER_S = 0.3
HUGE_CHARS = 3_000_000


@dataclass(frozen=True)
class Arrival:
    t: float  # time.monotonic() when the request arrived
    seed: int  # the request's sampling seed (one per synthesis request)
    fault: str  # "pass" when none


class FaultPlan:
    """The fault of each request: ``script`` first (in arrival order), then ``always`` if set,
    else with probability ``rate`` one drawn from ``mix`` (seeded), else ``pass``."""

    def __init__(
        self,
        script: Sequence[str] = (),
        *,
        mix: Sequence[str] = (),
        rate: float = 0.0,
        seed: int = 0,
        always: str | None = None,
    ) -> None:
        self._script = list(script)
        self._mix, self._rate, self._rng = list(mix), rate, random.Random(seed)
        self.always = always  # every request gets this fault (set to None to heal the endpoint)
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            if self._script:
                return self._script.pop(0)
            if self.always is not None:
                return self.always
            if self._mix and self._rng.random() < self._rate:
                return self._rng.choice(self._mix)
            return "pass"


@dataclass
class ProxyLog:
    arrivals: list[Arrival] = field(default_factory=list)

    @property
    def injected(self) -> Counter[str]:
        return Counter(a.fault for a in self.arrivals if a.fault != "pass")

    def by_seed(self) -> dict[int, list[Arrival]]:
        out: dict[int, list[Arrival]] = {}
        for a in self.arrivals:
            out.setdefault(a.seed, []).append(a)
        return out


_FIRST_TEXT = re.compile(r'":\s*\[?\s*"')


def _damage(fault: str, data: bytes) -> tuple[bytes, str]:
    """A real answer's body turned into the fault's; returns (body, content type)."""
    if fault == "not_json":
        return b"<html><body>502 Bad Gateway</body></html>", "text/html"
    if fault == "non_utf8":
        return data.replace(b'"content": "', b'"content": "\xff\xfe\xc3(', 1), "application/json"
    answer = json.loads(data)
    message = answer["choices"][0]["message"]
    if fault == "surrogate":  # a lone surrogate (JSON escape \ud800) inside the first text value
        message["content"] = _FIRST_TEXT.sub(
            lambda m: m.group(0) + "\ud800", message["content"], count=1
        )
    elif fault == "huge":  # an answer far over any length limit, in both stages' shapes
        big = "x" * HUGE_CHARS
        message["content"] = json.dumps(
            {
                "tasks": [big],
                "query": big,
                "positive": "p" * 20,
                "negatives": ["a" * 20, "b" * 20, "c" * 20, "d" * 20],
            }
        )
    elif fault == "no_choices":
        answer["choices"] = []
    elif fault == "content_number":
        message["content"] = 42
    elif fault == "content_list":
        message["content"] = [{"type": "text", "text": "hello"}]
    elif fault == "usage_strings":
        answer["usage"] = {"prompt_tokens": "ten", "completion_tokens": None, "total_tokens": "x"}
    elif fault == "no_usage":
        answer.pop("usage", None)
    elif fault == "bare_content":
        answer = {"choices": [{"message": {"content": message["content"]}}]}
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return json.dumps(answer).encode(), "application/json"


class _Proxy:
    def __init__(self, upstream: str, plan: FaultPlan, log: ProxyLog, timing: Timing) -> None:
        self.upstream, self.plan, self.log, self.timing = upstream.rstrip("/"), plan, log, timing
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        fault = self.plan.next()
        self.log.arrivals.append(Arrival(time.monotonic(), int(body.get("seed", -1)), fault))
        transport = request.transport
        if fault == "drop":
            assert transport is not None
            transport.abort()  # RST: no status line at all
            return web.Response()
        if fault == "hang":  # hold until the client gives up (its timeout) or hang_s passes
            t0 = time.monotonic()
            while (
                transport is not None
                and not transport.is_closing()
                and time.monotonic() - t0 < self.timing.hang_s
            ):
                await asyncio.sleep(0.02)
            return web.Response(status=504)
        if fault in ("429", "500", "503", "401"):
            # Like some real servers, the error text echoes the credentials it was sent.
            error = {"message": f"injected {fault} for {request.headers.get('Authorization', '')}"}
            headers = {"Retry-After": str(self.timing.retry_after_s)} if fault == "429" else {}
            return web.json_response({"error": error}, status=int(fault), headers=headers)
        if fault == "slow":
            await asyncio.sleep(self.timing.slow_s)
        assert self.session is not None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "content-type")
        }
        async with self.session.post(
            f"{self.upstream}/chat/completions", data=raw, headers=headers
        ) as r:
            status, data = r.status, await r.read()
        content_type = "application/json"
        if status == 200 and fault in BODY_FAULTS:
            data, content_type = _damage(fault, data)
        if (
            fault == "drip"
        ):  # the whole body, a few bytes at a time: every read is quick, the answer never ends in time
            response = web.StreamResponse(status=status, headers={"Content-Length": str(len(data))})
            response.content_type = content_type
            await response.prepare(request)
            t0 = time.monotonic()
            for i in range(0, len(data), 4):
                if (
                    transport is None
                    or transport.is_closing()
                    or time.monotonic() - t0 > self.timing.hang_s
                ):
                    break
                await response.write(data[i : i + 4])
                await asyncio.sleep(self.timing.drip_s)
            return response
        if fault == "cut":  # announce the whole body, send half, hang up
            response = web.StreamResponse(status=status, headers={"Content-Length": str(len(data))})
            response.content_type = content_type
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            assert transport is not None
            transport.abort()
            return response
        return web.Response(status=status, body=data, content_type=content_type)


@dataclass(frozen=True)
class Timing:
    slow_s: float = 0.2  # "slow": the answer comes this much later (under the client's timeout)
    hang_s: float = 10.0  # "hang": held until the client hangs up, or this long
    retry_after_s: float = RETRY_AFTER_S  # "429": the Retry-After header's seconds
    drip_s: float = 0.1  # "drip": the pause between 4-byte pieces of the body


@contextmanager
def fault_proxy(
    upstream: str, plan: FaultPlan, timing: Timing = Timing()
) -> Iterator[tuple[str, ProxyLog]]:
    """Serve the proxy on 127.0.0.1 in a thread; yield (base URL ending in /v1, its log)."""
    log = ProxyLog()
    proxy = _Proxy(upstream, plan, log, timing)
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    ready = threading.Event()
    runner_box: list[web.AppRunner] = []

    async def start() -> None:
        proxy.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        app = web.Application(client_max_size=2**26)
        app.router.add_post("/v1/chat/completions", proxy.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runner_box.append(runner)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("fault proxy did not start")

    async def stop() -> None:
        await runner_box[0].cleanup()
        assert proxy.session is not None
        await proxy.session.close()

    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", log
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
