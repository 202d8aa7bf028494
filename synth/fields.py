"""The ``stage2: fields`` state machine (models too small to write the JSON answer): one plain
text per request (the query, then its positive, then each level's negative), each checked as it
comes and asked again while attempts are left, and the examples that settle once all are in."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from synth.answers import (
    NEGATIVE_EQUALS_POSITIVE,
    NEGATIVE_EQUALS_QUERY,
    PARAPHRASES_PROMPT,
    QUERY_EQUALS_POSITIVE,
    Example,
    Rejected,
    parse_field,
    same_text,
    validate_example,
)
from synth.plan import Request, Stage, request_key
from synth.synth_config import SynthConfig
from synth.templates import LEVELS, FieldPrompts


def field_answer(config: SynthConfig, request: Request, record: dict[str, Any]) -> str:
    """The cleaned text of a `fields` answer, or :class:`Rejected` (also when it repeats the query
    or the positive it was given: a small model often copies its input)."""
    name = request.stage if request.level is None else f"negative level {request.level}"
    text = parse_field(
        record["content"],
        config.validation,
        request.echoes,
        field=name,
        truncated=record.get("finish_reason") == "length",
    )
    for given, reason in zip(request.given, FIELD_EQUALS[request.stage]):
        if same_text(text, given):
            raise Rejected(reason, name)
    threshold = config.validation.prompt_similarity
    if threshold is not None and request.echoes:
        from synth.embed import closest  # torch and the encoder only where the check is on

        score, phrase = closest(config.validation.similarity_model, text, request.echoes)
        if score >= threshold:
            raise Rejected(PARAPHRASES_PROMPT, f"{name} ~ {phrase!r} (cosine {score:.2f})")
    return text


# What a `fields` text must not equal: the texts it was given, in Request.given order.
FIELD_EQUALS = {
    "query": (),
    "positive": (QUERY_EQUALS_POSITIVE,),
    "negative": (NEGATIVE_EQUALS_QUERY, NEGATIVE_EQUALS_POSITIVE),
}


@dataclass(frozen=True)
class Slot:
    """One text of a `fields` example: its attempts so far and, once one is accepted, its text.
    A rejected answer is asked again (a new key, so a new sample) up to ``stage2_attempts`` times."""

    requests: tuple[Request, ...]
    text: str | None  # the accepted text
    rejected: tuple[tuple[Request, Rejected, str], ...]  # (attempt, why, raw answer)
    pending: bool  # the last attempt is not answered yet

    @property
    def exhausted(self) -> bool:
        return self.text is None and not self.pending


def _slot(
    config: SynthConfig, attempt: Callable[[int], Request], records: dict[str, dict[str, Any]]
) -> Slot:
    requests: list[Request] = []
    rejected: list[tuple[Request, Rejected, str]] = []
    for n in range(config.stage2_attempts):
        request = attempt(n)
        requests.append(request)
        record = records.get(request.key)
        if record is None:
            return Slot(tuple(requests), None, tuple(rejected), pending=True)
        try:
            return Slot(
                tuple(requests),
                field_answer(config, request, record),
                tuple(rejected),
                pending=False,
            )
        except Rejected as e:
            rejected.append((request, e, record["content"]))
    return Slot(tuple(requests), None, tuple(rejected), pending=False)


@dataclass(frozen=True)
class FieldExample:
    """The texts of one `stage2: fields` example as far as its answers allow: the query, then
    (once it is accepted) the positive, then (once that is accepted) the 4 negatives."""

    slots: tuple[Slot, ...]

    def requests(self) -> list[Request]:
        return [r for slot in self.slots for r in slot.requests]


def field_examples(
    config: SynthConfig,
    fields: FieldPrompts,
    model_id: str,
    examples: list[Request],
    records: dict[str, dict[str, Any]],
) -> list[FieldExample]:
    """Each planned example's requests given the journal. Keys hash the query a request was given
    and, for a repeat, its attempt number, so the plan is the same on every rerun."""
    seed, version = config.tasks.seed, fields.fields

    def make(
        step: Stage, ex: Request, given: tuple[str, ...] = (), level: int | None = None
    ) -> Callable[[int], Request]:
        sub, task = ex.subtask, ex.task
        assert task is not None
        context = [*given[:1], *([level] if level is not None else [])]
        query = given[0] if given else None
        return lambda n: Request(
            stage=step,
            subtask=sub,
            index=ex.index,
            task=task,
            prompt=version,
            level=level,
            key=request_key(
                step, model_id, version, sub, task, ex.index, seed, *context, *([n] if n else [])
            ),
            messages=fields.messages(step, sub, task, query, level),
            echoes=tuple(fields.echoes(step, sub, level)),
            given=given,
        )

    out = []
    for ex in examples:
        query = _slot(config, make("query", ex), records)
        if query.text is None:
            out.append(FieldExample((query,)))
            continue
        positive = _slot(config, make("positive", ex, (query.text,)), records)
        if positive.text is None:
            out.append(FieldExample((query, positive)))
            continue
        negatives = [
            _slot(config, make("negative", ex, (query.text, positive.text), level), records)
            for level in LEVELS
        ]
        out.append(FieldExample((query, positive, *negatives)))
    return out


# (request, its example or why not, the raw answer, whether it settles an example: a rejected
# `fields` text that is asked again does not); also what synth.assemble.json_candidates yields
Candidate = tuple[Request, "Example | Rejected", str, bool]


def field_candidates(
    config: SynthConfig, examples: list[FieldExample], records: dict[str, dict[str, Any]]
) -> Iterator[Candidate]:
    """Every rejected `fields` text, and each example once settled: its texts validated together,
    or rejected with the reason of a text that used up its attempts."""
    for ex in examples:
        settled = False  # the 4 negatives are asked together: two may use up their attempts
        for slot in ex.slots:
            for n, (request, why, raw) in enumerate(slot.rejected, start=1):
                settles = slot.exhausted and n == len(slot.rejected) and not settled
                settled |= settles
                yield request, why, raw, settles
        if any(slot.pending or slot.exhausted for slot in ex.slots) or len(ex.slots) != 2 + len(
            LEVELS
        ):
            continue
        texts = [slot.text or "" for slot in ex.slots]
        raw = json.dumps(
            {"query": texts[0], "positive": texts[1], "negatives": texts[2:]}, ensure_ascii=False
        )
        first = replace(ex.slots[0].requests[-1], stage="generate")  # the example as a whole
        try:
            yield (
                first,
                validate_example(
                    Example(query=texts[0], positive=texts[1], negatives=texts[2:]),
                    config.validation,
                ),
                raw,
                True,
            )
        except Rejected as e:
            yield first, e, raw, True
