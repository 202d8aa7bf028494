"""Loopback HTTP helpers for the synthesis tests: a recording proxy in front of the real local
server, and a scripted fake OpenAI-compatible server for answers and faults a real server cannot
produce on demand (exactly-malformed JSON, 429 with Retry-After, 500)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

# (status, headers, JSON body) for one chat-completions request body.
Responder = Callable[[dict[str, Any]], tuple[int, dict[str, str], dict[str, Any]]]


def chat_response(content: str, *, prompt_tokens: int = 10, completion_tokens: int = 20) -> dict[str, Any]:
    return {
        "id": "fake", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
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
