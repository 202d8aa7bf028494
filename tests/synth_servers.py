"""Loopback HTTP helpers for the synthesis tests: a recording proxy in front of the real local
server, a scripted fake OpenAI-compatible server for answers and faults a real server cannot
produce on demand (exactly-malformed JSON, 429 with Retry-After, 500), and SYNTH.yaml files for
it."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

# (status, headers, JSON body) for one chat-completions request body.
Responder = Callable[[dict[str, Any]], tuple[int, dict[str, str], dict[str, Any]]]


GOOD = {
    "query": "how do tides work",
    "positive": "Tides are caused by the moon's gravity.",
    "negatives": [
        "Tides of war shaped Europe.",
        "Ocean currents move heat.",
        "Moon phases repeat.",
        "Bread needs yeast.",
    ],
}


def good_with(**changes: Any) -> str:
    """A valid stage-2 answer with some fields changed."""
    return json.dumps({**GOOD, **changes})


def chat_response(
    content: str, *, prompt_tokens: int = 10, completion_tokens: int = 20
) -> dict[str, Any]:
    return {
        "id": "fake",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def prompt_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()[:12]


class Recorder:
    """Every request body seen, in arrival order (thread-safe)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.bodies.append(body)

    def seeds(self) -> list[int]:
        with self._lock:
            return [b["seed"] for b in self.bodies]


@contextmanager
def serve(respond: Responder, recorder: Recorder | None = None) -> Iterator[str]:
    """Run ``respond`` behind ``POST /v1/chat/completions`` on 127.0.0.1; yield the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if recorder is not None:
                recorder.add(body)
            status, headers, payload = respond(body)
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client was killed while waiting: what the kill tests do

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def forward_to(base_url: str, timeout: float = 900) -> Responder:
    """A recording proxy's responder: pass the request to the real server unchanged."""
    client = httpx.Client(timeout=timeout)

    def respond(body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        r = client.post(f"{base_url}/chat/completions", json=body)
        return r.status_code, {}, r.json()

    return respond


def synth_config_file(tmp_path: Path, **overrides: Any) -> Path:
    """A small SYNTH.yaml for the fake server (16 requests: 4 brainstorm, 12 examples); top-level
    mappings in ``overrides`` are merged into the defaults, other values replace them."""
    raw: dict[str, Any] = {
        "name": "synth-test",
        "output": str(tmp_path / "corpus"),
        "endpoint": {
            "model": "fake-model",
            "api_key_env": "NM_TEST_KEY",
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.05,
            "timeout_s": 30,
            "response_format": "json_object",
        },
        "concurrency": 3,
        "sampling": {"brainstorm_max_tokens": 64, "generate_max_tokens": 64},
        "budget": {"price_per_1m_input": 2.5, "price_per_1m_output": 10.0},
        "tasks": {"brainstorm_requests": 2, "examples": {"short-long": 6, "sts": 6}, "seed": 1},
    }
    for k, v in overrides.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def scripted(
    faults: dict[str, list[int]] | None = None, delay_s: float = 0.0, paraphrase: bool = False
) -> Responder:
    """Deterministic answers from the prompt (same prompt, same answer), with HTTP faults
    injected by prompt: ``faults[subtask-marker] = [429, 500]`` answers those statuses first.
    ``delay_s`` per answer leaves time to kill a client mid-run; ``paraphrase``: see
    :func:`field_answer`."""
    seen: Counter[str] = Counter()
    pending = {k: list(v) for k, v in (faults or {}).items()}

    def respond(body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        text, h = body["messages"][0]["content"], prompt_hash(body)
        time.sleep(delay_s)
        for marker, statuses in pending.items():
            if marker in text and statuses:
                status = statuses.pop(0)
                headers = {"Retry-After": "0.05"} if status == 429 else {}
                return status, headers, {"error": {"message": f"injected {status}"}}
        if text.startswith("Brainstorm"):
            return (
                200,
                {},
                chat_response(
                    json.dumps(
                        {
                            "tasks": [
                                f"Given a {h} question, find passages.",
                                "Given a claim, find evidence.",
                            ]
                        }
                    )
                ),
            )
        seen[h] += 1
        if "Answer with the text only" in text:  # stage2: fields, one plain text per request
            return 200, {}, chat_response(field_answer(text, body["seed"], paraphrase))
        n = (
            body["seed"] % 4
        )  # the seed is derived from the request key: one fixed answer per request
        if n == 0:
            return 200, {}, chat_response('{"query": "broken')  # exactly malformed
        if n == 1:
            return (
                200,
                {},
                chat_response(
                    good_with(
                        negatives=[GOOD["positive"], "bread rises", "cats purr", "rain falls"]
                    )
                ),
            )
        return (
            200,
            {},
            chat_response(
                json.dumps(
                    {
                        "query": f"query {body['seed']}",
                        "positive": f"positive {body['seed']}",
                        "negatives": [f"hard {body['seed']}", "medium one", "medium two", "easy"],
                    }
                )
            ),
        )

    return respond


_LEVEL_MARKERS = {
    "same topic": 1,
    "related topic, partly": 2,
    "loosely related": 3,
    "different topic": 4,
}


# "answer with the text only" in other words (MiniLM cosine 0.78-0.88 to it)
PARAPHRASES = (
    "Text only as the answer.",
    "Text only as the answer, as asked.",
    "The text only, as the answer.",
)


def field_answer(prompt: str, seed: int, paraphrase: bool = False) -> str:
    """A deterministic plain-text answer to a `stage2: fields` prompt. Queries vary by the seed:
    seed % 5 == 0 copies its instructions (rejected as echoes_prompt), == 1 comes labelled and
    quoted (cleaned, accepted); with ``paraphrase``, == 2 says its instructions in other words
    (caught only by the embedding check). A positive repeats its query when seed % 3 == 0
    (rejected). Negatives end with "L<level>" read from the prompt's level wording."""
    if "Write the input" in prompt:
        if seed % 5 == 0:
            return "Answer with the text only, nothing else."
        if paraphrase and seed % 5 == 2:
            return PARAPHRASES[seed // 5 % len(PARAPHRASES)]
        return f'Query: "topic {seed} question"' if seed % 5 == 1 else f"topic {seed} question"
    query = prompt.split("Input: ", 1)[1].split("\n", 1)[0]
    if "Write the matching result" in prompt:
        return query if seed % 3 == 0 else f"The answer about {query}."
    level = next(v for k, v in _LEVEL_MARKERS.items() if k in prompt)
    return f"Unrelated text on {query} L{level}"


def without_usage(respond: Responder) -> Responder:
    """``respond`` with the ``usage`` block left out, as some OpenAI-compatible servers answer."""

    def stripped(body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        status, headers, payload = respond(body)
        return status, headers, {k: v for k, v in payload.items() if k != "usage"}

    return stripped
