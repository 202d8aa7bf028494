"""An async chat-completions client for any OpenAI-compatible endpoint, with retries and a budget.

Retries are done here rather than by the ``openai`` client (built with ``max_retries=0``) so each
retry is counted and the policy is explicit: exponential backoff with full jitter on 429, 5xx,
timeouts and connection errors, honouring a server's ``Retry-After``. Other errors (400, 401, 404)
are not retried: they will not get better. The token budget is checked before each request, so a
run stops with at most the requests already in flight over it.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import openai
from openai import AsyncOpenAI

from synth.synth_config import Budget, Endpoint

RETRY_STATUS = {408, 409, 429} | set(range(500, 600))


FATAL_STATUS = {401, 403, 404}  # every other request would fail the same way: stop the run


class EndpointError(RuntimeError):
    """A request failed for good (not retryable, or out of retries); names status and endpoint.

    ``fatal`` errors (bad key, unknown model or URL) end the run; others fail only their request.
    """

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


@dataclass(frozen=True)
class Completion:
    content: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


@dataclass
class Usage:
    """Tokens spent (all runs of a corpus together, the journal included) and their estimated cost."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.requests += 1

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
        self, endpoint: Endpoint, *, base_url: str | None, model: str, api_key: str,
        usage: Usage, extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.usage = usage  # shared with the caller, which may have counted earlier runs in it
        self.retries = 0
        self._extra_body = extra_body or {}
        self._rng = random.Random()
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
        kwargs: dict[str, Any] = dict(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, seed=seed,
        )
        if response_format is not None:
            kwargs["response_format"] = response_format
        if self._extra_body:
            kwargs["extra_body"] = self._extra_body
        for attempt in range(self.endpoint.max_retries + 1):
            try:
                response = await self._client.chat.completions.create(**kwargs)
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS or attempt == self.endpoint.max_retries:
                    raise EndpointError(
                        self._describe(f"HTTP {e.status_code}", e, attempt), fatal=e.status_code in FATAL_STATUS
                    ) from None
                wait = retry_after_s(e)
                wait = backoff_s(attempt, self.endpoint, self._rng) if wait is None else wait
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                if attempt == self.endpoint.max_retries:
                    raise EndpointError(self._describe(type(e).__name__, e, attempt)) from None
                wait = backoff_s(attempt, self.endpoint, self._rng)
            else:
                return self._completion(response)
            self.retries += 1
            await asyncio.sleep(wait)
        raise AssertionError("unreachable: the loop returns or raises")

    def _completion(self, response: Any) -> Completion:
        if not response.choices:
            raise EndpointError(f"{self._client.base_url}: an answer without choices")
        choice = response.choices[0]
        usage = response.usage
        prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        self.usage.add(prompt, completion)
        return Completion(
            content=choice.message.content or "",
            prompt_tokens=prompt,
            completion_tokens=completion,
            finish_reason=choice.finish_reason,
        )

    def _describe(self, what: str, error: Exception, attempt: int) -> str:
        message = getattr(error, "message", None) or str(error)
        return f"{self._client.base_url} ({self.model}): {what} after {attempt + 1} attempt(s): {message[:300]}"
