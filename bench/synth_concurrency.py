"""Synthesis concurrency: requests/s of `synth generate` against an endpoint with a fixed delay.

A tiny OpenAI-compatible server (aiohttp, in a child process like a remote endpoint) answers every
``POST /v1/chat/completions`` after exactly ``--delay`` seconds with a valid answer for either stage
(a task list for stage 1, a unique query / positive / 4 negatives for stage 2). The real
``synth generate`` code path (``synth.generate.generate``: request plan, async client with retries,
journal flushed per answer and fsynced at most once a second, validation, corpus written at the
end) runs against it with
``concurrency`` = 1, 8, 32, 128 requests in flight, ``--rounds`` x in-flight stage-2 requests each
(given task descriptions, so no stage-1 barrier). The bound is in-flight / delay requests/s;
efficiency = measured / bound, where measured = requests / the whole generate() call. The server
also reports the most requests it saw in flight and its own window (first arrival to last
answer). Levels are interleaved over --reps rounds; medians are reported.
Target (issue 7): at least 80% of the bound up to 32 in flight.

    python bench/synth_concurrency.py --inflight 1 8 32 128 --delay 0.5
"""

from __future__ import annotations

# _common first: importing it sets the offline environment (HF_HUB_OFFLINE, ...)
from _common import Report, median, parse, parser, rounds, spread, verdict

# isort: split
import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NAME = "synth_concurrency"
QUICK = {"inflight": [1, 8], "delay": 0.1, "rounds": 4, "reps": 1}
KEY_ENV = "NM_BENCH_SYNTH_KEY"
SUBTASKS = ("short-long", "long-short", "short-short", "long-long", "sts")
TARGET_UP_TO = 32


# ---------------------------------------------------------------- the fixed-delay server


def serve(delay: float) -> None:
    """Run the server on 127.0.0.1 (a free port, printed as ``PORT n``) until killed."""
    from aiohttp import web

    stats = {"requests": 0, "in_flight": 0, "peak": 0, "first": None, "last": None}
    counter = 0

    def answer(body: dict[str, Any]) -> str:
        nonlocal counter
        counter += 1
        n = counter
        if body["messages"][0]["content"].startswith("Brainstorm"):
            return json.dumps(
                {
                    "tasks": [
                        f"Given a question about topic {n}, find passages that answer it.",
                        f"Given a claim about topic {n}, find evidence for it.",
                    ]
                }
            )
        return json.dumps(
            {
                "query": f"what is item {n} about",
                "positive": f"Item {n} is about the subject numbered {n}.",
                "negatives": [
                    f"Item {n + 1} is about something close.",
                    f"Medium negative {n} a.",
                    f"Medium negative {n} b.",
                    f"An easy negative, number {n}.",
                ],
            }
        )

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        stats["requests"] += 1
        stats["in_flight"] += 1
        stats["peak"] = max(stats["peak"], stats["in_flight"])
        stats["first"] = stats["first"] or time.time()
        try:
            await asyncio.sleep(delay)
        finally:
            stats["in_flight"] -= 1
        stats["last"] = time.time()
        return web.json_response(
            {
                "id": f"bench-{stats['requests']}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fixed-delay"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": answer(body)},
                    }
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
            }
        )

    async def read_stats(request: web.Request) -> web.Response:
        out = dict(stats)
        stats.update(requests=0, peak=stats["in_flight"], first=None, last=None)
        return web.json_response(out)

    async def serve_forever() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/stats", read_stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        print(f"PORT {runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve_forever())


class Server:
    """The server in a child process (own interpreter and event loop, like a remote endpoint)."""

    def __init__(self, delay: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--delay", str(delay)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"the fixed-delay server did not start (got {line!r})")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------- the client: synth generate


def synth_config(url: str, out: Path, inflight: int, requests: int) -> Any:
    from synth.synth_config import SynthConfig

    per, extra = divmod(requests, len(SUBTASKS))
    return SynthConfig.model_validate(
        {
            "name": "bench-synth-concurrency",
            "output": str(out),
            "endpoint": {
                "base_url": f"{url}/v1",
                "model": "fixed-delay",
                "api_key_env": KEY_ENV,
                "response_format": "json_object",
                "timeout_s": 120,
                "max_retries": 2,
            },
            "concurrency": inflight,
            "tasks": {
                "brainstorm_requests": 0,
                "examples": {s: per + (i < extra) for i, s in enumerate(SUBTASKS)},
                "given": {
                    s: [f"Given a {s} retrieval task, find the matching text."] for s in SUBTASKS
                },
                "seed": 0,
            },
        }
    )


@contextmanager
def journal_clock() -> Iterator[list[float]]:
    """Times ``JournalWriter.append`` (write + flush, grouped fsync, on the event loop's thread) inside
    the block; yields a one-item list holding the seconds. Instrumentation only: the method
    itself runs unchanged."""
    from synth.journal import JournalWriter

    original = JournalWriter.append
    spent = [0.0]

    def append(writer: Any, record: dict[str, Any]) -> None:
        tick = time.perf_counter()
        try:
            original(writer, record)
        finally:
            spent[0] += time.perf_counter() - tick

    JournalWriter.append = append  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        JournalWriter.append = original  # type: ignore[method-assign]


def run_level(server: Server, inflight: int, requests: int, scratch: Path) -> dict[str, float]:
    from synth.generate import generate

    config = synth_config(
        server.url, scratch / f"corpus-{inflight}-{time.monotonic_ns()}", inflight, requests
    )
    server.stats()  # reset the server's counters
    with journal_clock() as journal:
        tick, cpu = time.perf_counter(), time.process_time()
        result = generate(config, progress=False)
        wall, cpu = time.perf_counter() - tick, time.process_time() - cpu
    stats = server.stats()
    answered = result.corpus.manifest["requests"]["generate"]["answered"]
    if answered != requests or not result.complete:
        raise RuntimeError(
            f"{inflight} in flight: {answered}/{requests} answered "
            f"({result.corpus.manifest['stopped']})"
        )
    return {
        "wall": wall,
        "rate": requests / wall,
        "peak": float(stats["peak"]),
        "cpu_ms": 1000 * cpu / requests,
        "busy": cpu / wall,
        "journal_ms": 1000 * journal[0] / requests,
        "journal_share": journal[0] / wall,
        "server_rate": requests / max(1e-9, stats["last"] - stats["first"]),
        "rows": float(len(result.corpus)),
    }


def profile_level(server: Server, inflight: int, rounds_: int, scratch: Path, top: int = 14) -> str:
    """Top functions by own time of one generate() call, under cProfile."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_level(server, inflight, max(16, rounds_ * inflight), scratch)
    prof.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(prof, stream=buffer)
    stats.sort_stats("tottime").print_stats(top)
    lines = buffer.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    site = str(Path(os.__file__).parent)
    return "\n".join(
        line.replace(site, "<stdlib>").replace(str(Path.cwd()) + "/", "")
        for line in lines[start:]
        if line.strip()
    )


def main() -> None:
    ap = parser(__doc__, NAME)
    ap.add_argument(
        "--inflight",
        type=int,
        nargs="+",
        default=[1, 8, 32, 128],
        help="requests in flight (synth concurrency)",
    )
    ap.add_argument("--delay", type=float, default=0.5, help="seconds the server takes per answer")
    ap.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="requests per level = rounds x in-flight (at least 16)",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile run of the client")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    if "--serve" in sys.argv:
        serve(ap.parse_args().delay)
        return
    args = parse(ap, QUICK)
    os.environ.setdefault(KEY_ENV, "bench-key-not-a-secret")

    server = Server(args.delay)
    results: dict[int, list[dict[str, float]]] = {n: [] for n in args.inflight}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
            scratch = Path(tmp)
            # warm-up: imports, first connections
            run_level(server, min(8, max(args.inflight)), 16, scratch)
            top = max(args.inflight)
            profile = "" if args.no_profile else profile_level(server, top, args.rounds, scratch)
            for r, n in rounds([str(n) for n in args.inflight], args.reps):
                level = int(n)
                out = run_level(server, level, max(16, args.rounds * level), scratch)
                results[level].append(out)
                print(
                    f"round {r + 1}: {level:>4} in flight: {out['rate']:.1f} req/s "
                    f"({out['rate'] * args.delay / level:.0%} of the bound), "
                    f"peak {out['peak']:.0f}",
                    flush=True,
                )
    finally:
        server.close()

    report = Report(
        "Synthesis concurrency: synth generate against a fixed-delay endpoint",
        libs=("openai", "aiohttp"),
    )
    report.para(
        f"Server: aiohttp in a child process, every answer after {args.delay:g} s. Client: "
        "synth.generate.generate (stage 2 only: given tasks), journal flushed per answer (fsync grouped), corpus "
        "written at the end, all inside the timed call. "
        f"Requests per level: max(16, {args.rounds} x "
        f"in-flight); {args.reps} interleaved reps after a warm-up run; medians."
    )
    rows, ok = [], True
    for level, outs in results.items():
        rate = median(o["rate"] for o in outs)
        bound = level / args.delay
        eff = rate / bound
        if level <= TARGET_UP_TO:
            ok = ok and eff >= 0.8
        rows.append(
            (
                level,
                max(16, args.rounds * level),
                f"{bound:.1f}",
                f"{rate:.1f}",
                spread([o["rate"] for o in outs], 1),
                f"**{eff:.2f}**",
                f"{median(o['server_rate'] for o in outs) / bound:.2f}",
                f"{max(o['peak'] for o in outs):.0f}",
                f"{median(o['cpu_ms'] for o in outs):.1f}",
                f"{100 * median(o['busy'] for o in outs):.0f}%",
                f"{median(o['journal_ms'] for o in outs):.1f}",
                f"{100 * median(o['journal_share'] for o in outs):.0f}%",
            )
        )
    report.table(
        [
            "in flight",
            "requests",
            "bound (req/s)",
            "measured (req/s)",
            "spread",
            "efficiency",
            "server-side efficiency",
            "peak in flight at server",
            "client CPU ms / request",
            "client CPU busy",
            "journal append ms / request",
            "loop blocked in journal",
        ],
        rows,
    )
    report.para(
        f"Target: at least 80% of the bound up to {TARGET_UP_TO} in flight: {verdict(ok)}. "
        "Server-side efficiency uses the server's window (first arrival to last answer) instead "
        "of the whole call: the difference is the client's fixed cost (plan, client set-up, "
        "corpus write). "
        "Client CPU = process CPU time of the generate() call; busy near 100% means the client, "
        "not the endpoint, is the limit (its ceiling is about 1000 / CPU ms requests/s). Journal "
        "append = write + flush of each answer (+ an fsync at most once a second), timed around "
        "JournalWriter.append; it runs "
        "on the event loop's thread, so while it waits on the disk no other request progresses "
        "(share of the call's wall time)."
    )
    if profile:
        report.para(
            f"cProfile of the client at {max(args.inflight)} in flight (an extra, untimed "
            "run; profiling slows it down), top functions by own time:"
        )
        report.code(profile)
    report.write(args.out)


if __name__ == "__main__":
    main()
