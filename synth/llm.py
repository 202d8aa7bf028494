"""An async chat-completions client for any OpenAI-compatible endpoint, with retries and a budget.

Retries are done here rather than by the ``openai`` client (built with ``max_retries=0``) so each
retry is counted and the policy is explicit: exponential backoff with full jitter on 429, 5xx,
timeouts, connection errors and answers that are not a chat completion (a gateway's HTML page, a
body that is not UTF-8 JSON, no choices, content that is not text), honouring a server's
``Retry-After`` up to ``backoff_max_s``. Other errors (400, 401, 404) are not retried: they will not
get better. The token budget is checked before each request, so a run stops with at most the
requests already in flight over it. Error messages never carry the API key, even when a server
echoes it back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import openai
from openai import AsyncOpenAI

from synth.synth_config import Budget, Endpoint

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429} | set(range(500, 600))


FATAL_STATUS = {401, 403, 404}  # every other request would fail the same way: stop the run


class EndpointError(RuntimeError):
    """A request failed for good (not retryable, or out of retries); names status and endpoint.

    ``fatal`` errors (bad key, unknown model or URL) end the run; others fail only their request.
    """

    def __init__(self, message: str, *, fatal: bool = False, kind: str = "error") -> None:
        super().__init__(message)
        self.fatal = fatal
        self.kind = kind  # counted per run: http_<status>, timeout, connection, bad_response


class BadResponse(ValueError):
    """An HTTP 200 whose body is not a usable chat completion; the message says what it was."""


# Tokens of an answer whose endpoint sent no `usage` block: OpenAI's rule of thumb for English text
# (about 4 characters a token). Rough, but it keeps budget.max_tokens binding; the manifest says so.
CHARS_PER_TOKEN = 4
# No tokenizer's token is longer than this many characters in practice: an answer longer than
# max_tokens times this broke the request's limit, and only that much of it is kept (journal, rejects).
MAX_CHARS_PER_TOKEN = 32


def estimate_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Completion:
    content: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    usage_estimated: bool = False  # the endpoint sent no token counts: estimated (CHARS_PER_TOKEN)


@dataclass
class Usage:
    """Tokens spent (all runs of a corpus together, the journal included) and their estimated cost."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    estimated_requests: int = 0  # answers without a usage block, counted at CHARS_PER_TOKEN

    def add(self, prompt_tokens: int, completion_tokens: int, *, estimated: bool = False) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.requests += 1
        self.estimated_requests += int(estimated)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def cost(self, budget: Budget) -> float:
        return (
            self.prompt_tokens * budget.price_per_1m_input
            + self.completion_tokens * budget.price_per_1m_output
        ) / 1e6

    def exhausted(self, budget: Budget) -> bool:
        return budget.max_tokens is not None and self.total_tokens >= budget.max_tokens

    def report(self, budget: Budget) -> dict[str, Any]:
        return {
            **asdict(self),
            "total_tokens": self.total_tokens,
            "estimated_cost_usd": round(self.cost(budget), 6),
            "price_per_1m_input": budget.price_per_1m_input,
            "price_per_1m_output": budget.price_per_1m_output,
            "max_tokens": budget.max_tokens,
            "token_count": (
                "endpoint usage"
                if not self.estimated_requests
                else f"estimated at {CHARS_PER_TOKEN} characters a token"
                f" for {self.estimated_requests} answers without usage"
            ),
        }


def retry_after_s(error: openai.APIStatusError) -> float | None:
    """Seconds a server asked us to wait (``Retry-After``: seconds or an HTTP date), if any."""
    value = error.response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_s(attempt: int, endpoint: Endpoint, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, initial * 2**attempt)] (AWS architecture blog)."""
    return rng.uniform(0, min(endpoint.backoff_max_s, endpoint.backoff_initial_s * 2**attempt))


class ChatClient:
    """``complete(messages, ...)`` with retries; one instance per run, shared by all workers."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        base_url: str | None,
        model: str,
        api_key: str,
        usage: Usage,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.usage = usage  # shared with the caller, which may have counted earlier runs in it
        self.retries = 0
        self._warned = False
        self._extra_body = extra_body or {}
        self._rng = random.Random()
        self._api_key = api_key
        self._client = AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=endpoint.timeout_s, max_retries=0
        )

    async def close(self) -> None:
        await self._client.close()

    async def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        response_format: dict[str, Any] | None,
    ) -> Completion:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        if response_format is not None:
            kwargs["response_format"] = response_format
        if self._extra_body:
            kwargs["extra_body"] = self._extra_body
        for attempt in range(self.endpoint.max_retries + 1):
            last = attempt == self.endpoint.max_retries
            try:
                # the client's timeout is per read: a server sending a byte at a time would hold
                # the request forever, so the whole request gets the same deadline
                response = await asyncio.wait_for(
                    self._client.chat.completions.create(**kwargs), self.endpoint.timeout_s
                )
                return self._completion(response, messages, max_tokens)
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS or last:
                    raise EndpointError(
                        self._describe(f"HTTP {e.status_code}", e, attempt),
                        fatal=e.status_code in FATAL_STATUS,
                        kind=f"http_{e.status_code}",
                    ) from None
                wait = retry_after_s(e)
                wait = backoff_s(attempt, self.endpoint, self._rng) if wait is None else wait
                wait = min(wait, self.endpoint.backoff_max_s)
            except (openai.APITimeoutError, openai.APIConnectionError, TimeoutError) as e:
                if last:
                    kind = (
                        "connection"
                        if isinstance(e, openai.APIConnectionError)
                        and not isinstance(e, openai.APITimeoutError)
                        else "timeout"
                    )
                    if isinstance(e, TimeoutError) and not str(e):  # our own deadline
                        e = TimeoutError(
                            f"no complete answer within timeout_s={self.endpoint.timeout_s:g}"
                        )
                    message = self._describe(type(e).__name__, e, attempt)
                    raise EndpointError(message, kind=kind) from None
                wait = backoff_s(attempt, self.endpoint, self._rng)
            except (BadResponse, openai.APIResponseValidationError, ValueError) as e:
                # ValueError: the client could not decode the body (not UTF-8, not JSON)
                if last:
                    message = self._describe("bad response", e, attempt)
                    raise EndpointError(message, kind="bad_response") from None
                wait = backoff_s(attempt, self.endpoint, self._rng)
            self.retries += 1
            await asyncio.sleep(wait)
        raise AssertionError("unreachable: the loop returns or raises")

    def _completion(
        self, response: Any, messages: list[dict[str, str]], max_tokens: int
    ) -> Completion:
        """Check that ``response`` is a chat completion (the client does not validate it)."""
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            shown = response[:80] if isinstance(response, str) else type(response).__name__
            raise BadResponse(f"an answer without choices: {shown!r}")
        choice = choices[0]
        content = getattr(getattr(choice, "message", None), "content", None)
        if not isinstance(content, (str, type(None))):
            raise BadResponse(f"message content is {type(content).__name__}, expected text")
        finish_reason = getattr(choice, "finish_reason", None)
        limit = max(4096, MAX_CHARS_PER_TOKEN * max_tokens)
        if content is not None and len(content) > limit:  # more than max_tokens can hold: cut it,
            content, finish_reason = content[:limit], "length"  # it is rejected as truncated
        usage = getattr(response, "usage", None)
        prompt, completion = _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")
        estimated = prompt + completion == 0  # no usage block (or an empty one): count them here
        if estimated:
            prompt = sum(estimate_tokens(str(m.get("content") or "")) for m in messages)
            completion = estimate_tokens(content or "")
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s sends no token usage: counting tokens at %d characters a token (budget and "
                    "cost are estimates; the manifest says so)",
                    self._client.base_url,
                    CHARS_PER_TOKEN,
                )
        self.usage.add(prompt, completion, estimated=estimated)
        return Completion(
            content=valid_unicode(content or ""),
            prompt_tokens=prompt,
            completion_tokens=completion,
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
            usage_estimated=estimated,
        )

    def _describe(self, what: str, error: Exception, attempt: int) -> str:
        message = getattr(error, "message", None) or str(error)
        if len(self._api_key) >= 8:  # a server may echo the key in its error text
            message = message.replace(self._api_key, "***")
        return f"{self._client.base_url} ({self.model}): {what} after {attempt + 1} attempt(s): {message[:300]}"


def _tokens(usage: Any, name: str) -> int:
    """A token count from ``usage`` (0 when the server sent none or not a count)."""
    value = getattr(usage, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def valid_unicode(text: str) -> str:
    """``text`` with code points UTF-8 cannot hold (lone surrogates from ``\\ud800`` escapes)
    replaced by U+FFFD, so the journal, the rejects and the parquet can always be written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text
