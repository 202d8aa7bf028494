"""Parse and validate LLM answers for both synthesis stages; a bad answer gets one reason.

Stage 2 answers are JSON objects ``{"query", "positive", "negatives": [4 texts]}`` with the
negatives ordered from level 1 (hardest, most similar to the query) to level 4 (easiest). Small
models wrap JSON in Markdown fences or chat around it, so the first JSON object in the text is
parsed; everything else is strict. Reasons are stable strings, counted in the manifest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from synth.synth_config import Validation

# Reject reasons (the manifest counts answers by these names).
MALFORMED_JSON = "malformed_json"
TRUNCATED = "truncated"  # malformed because the answer hit max_tokens
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
WRONG_NEGATIVE_COUNT = "wrong_negative_count"
EMPTY_TEXT = "empty_text"
INVALID_UNICODE = "invalid_unicode"  # see is_text
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
QUERY_EQUALS_POSITIVE = "query_equals_positive"
NEGATIVE_EQUALS_QUERY = "negative_equals_query"
NEGATIVE_EQUALS_POSITIVE = "negative_equals_positive"
DUPLICATE_NEGATIVES = "duplicate_negatives"
NO_TASKS = "no_tasks"
DUPLICATE_QUERY = "duplicate_query"
DUPLICATE_POSITIVE = "duplicate_positive"
ECHOES_PROMPT = "echoes_prompt"  # a one-text answer that copies its instructions (stage2: fields)
PARAPHRASES_PROMPT = "paraphrases_prompt"  # ... or says them again in other words (embedding check)

# A task description is one sentence; shorter entries are placeholders copied from the prompt
# ("first task", "Given ...").
MIN_TASK_CHARS, MAX_TASK_CHARS = 15, 300

_PYDANTIC_REASONS = {
    "missing": MISSING_FIELD,
    "string_type": WRONG_TYPE,
    "list_type": WRONG_TYPE,
    "too_short": WRONG_NEGATIVE_COUNT,
    "too_long": WRONG_NEGATIVE_COUNT,
}


class Example(BaseModel):
    """A stage-2 answer: negatives[0] is level 1 (hardest) ... negatives[3] level 4 (easiest)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    query: str
    positive: str
    negatives: list[str] = Field(min_length=4, max_length=4)

    @field_validator("query", "positive")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()

    @field_validator("negatives")
    @classmethod
    def _strip_all(cls, v: list[str]) -> list[str]:
        return [s.strip() for s in v]


class TaskList(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    tasks: list[str]


def _schema(model: type[BaseModel], name: str) -> dict[str, Any]:
    """An OpenAI ``json_schema`` response format: every field required, nothing extra."""
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema["properties"].values():
        prop.pop("title", None)
    schema["additionalProperties"] = False
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}


EXAMPLE_SCHEMA = _schema(Example, "mgh_example")
TASKS_SCHEMA = _schema(TaskList, "mgh_tasks")


class Rejected(ValueError):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str, *, truncated: bool = False) -> Any:
    """The first JSON value in ``text`` (inside a Markdown fence if there is one)."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    starts = [i for i in (body.find("{"), body.find("[")) if i >= 0]
    if not starts:
        raise Rejected(TRUNCATED if truncated else MALFORMED_JSON, "no JSON object in the answer")
    try:
        value, _ = json.JSONDecoder().raw_decode(body[min(starts) :])
    except json.JSONDecodeError as e:
        raise Rejected(TRUNCATED if truncated else MALFORMED_JSON, e.msg) from None
    return value


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def same_text(a: str, b: str) -> bool:
    """Equal up to case and whitespace (how every "equals" check compares texts)."""
    return _norm(a) == _norm(b)


def is_text(text: str) -> bool:
    """False for text holding U+FFFD (undecodable bytes upstream) or code points UTF-8 cannot
    hold (a lone surrogate from a ``\\ud800`` JSON escape): such text cannot go into a corpus."""
    if "\ufffd" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_length(text: str, field: str, limits: Validation) -> None:
    if not text:
        raise Rejected(EMPTY_TEXT, field)
    if not is_text(text):
        raise Rejected(INVALID_UNICODE, field)
    if len(text) < limits.min_chars:
        raise Rejected(TOO_SHORT, f"{field} has {len(text)} chars")
    if len(text) > limits.max_chars:
        raise Rejected(TOO_LONG, f"{field} has {len(text)} chars (max {limits.max_chars})")


def parse_example(text: str, limits: Validation, *, truncated: bool = False) -> Example:
    """Validate a stage-2 answer or raise :class:`Rejected` with its reason."""
    value = extract_json(text, truncated=truncated)
    if not isinstance(value, dict):
        raise Rejected(NOT_AN_OBJECT, type(value).__name__)
    try:
        example = Example.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise Rejected(
            _PYDANTIC_REASONS.get(first["type"], WRONG_TYPE), f"{where}: {first['msg']}"
        ) from None
    return validate_example(example, limits)


def validate_example(example: Example, limits: Validation) -> Example:
    """The checks every example passes, however it was written: lengths, no text equal to another."""
    _check_length(example.query, "query", limits)
    _check_length(example.positive, "positive", limits)
    for level, negative in enumerate(example.negatives, start=1):
        _check_length(negative, f"negatives[{level}]", limits)
    query, positive = _norm(example.query), _norm(example.positive)
    if query == positive:
        raise Rejected(QUERY_EQUALS_POSITIVE)
    negatives = [_norm(n) for n in example.negatives]
    for level, negative in enumerate(negatives, start=1):
        if negative == query:
            raise Rejected(NEGATIVE_EQUALS_QUERY, f"level {level}")
        if negative == positive:
            raise Rejected(NEGATIVE_EQUALS_POSITIVE, f"level {level}")
    if len(set(negatives)) < len(negatives):
        raise Rejected(DUPLICATE_NEGATIVES)
    return example


_LABEL = re.compile(
    r"^(?:query|input|output|answer|result|text|passage|sentence|title)\s*:\s*", re.IGNORECASE
)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}


def _unquote(text: str) -> str:
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        return text[1:-1].strip()
    return text


def parse_field(
    text: str,
    limits: Validation,
    echoes: Sequence[str] = (),
    *,
    field: str = "text",
    truncated: bool = False,
) -> str:
    """One plain-text answer (``stage2: fields``): its first paragraph, without a leading label
    ("Query: ...") or wrapping quotes, whitespace collapsed; rejected when truncated, out of the
    length limits, or when it copies a phrase of its own prompt (``echoes``)."""
    if truncated:
        raise Rejected(TRUNCATED, field)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    cleaned = _unquote(_LABEL.sub("", _unquote(paragraphs[0] if paragraphs else "")))
    cleaned = " ".join(cleaned.split())
    _check_length(cleaned, field, limits)
    folded = _norm(cleaned)
    for phrase in echoes:
        if phrase and _norm(phrase) in folded:
            raise Rejected(ECHOES_PROMPT, f"{field} repeats {phrase!r}")
    return cleaned


def parse_tasks(text: str, limits: Validation, *, truncated: bool = False) -> list[str]:
    """Task descriptions from a stage-1 answer (``{"tasks": [...]}`` or a bare list).

    Individual bad entries (not strings, placeholders, over-long) are dropped; an answer with no
    usable task is rejected.
    """
    value = extract_json(text, truncated=truncated)
    if isinstance(value, dict):
        value = value.get("tasks")
    if not isinstance(value, list):
        raise Rejected(NO_TASKS, "expected a list under 'tasks'")
    tasks = [
        " ".join(t.split())
        for t in value
        if isinstance(t, str) and MIN_TASK_CHARS <= len(t.strip()) <= MAX_TASK_CHARS and is_text(t)
    ]
    if not tasks:
        raise Rejected(NO_TASKS, "no usable task description")
    return tasks
