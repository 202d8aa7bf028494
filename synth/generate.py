"""``synth generate``: MGH synthesis (multi-granularity hard negatives) over an OpenAI-compatible API.

Stage 1 brainstorms task descriptions for each subtask (asymmetric: short-long, long-short,
short-short, long-long; symmetric: sts). Stage 2 asks, for tasks sampled from those with a seed,
for one example each: a query, a positive and 4 negatives graded by similarity to the query
(level 1 hard, levels 2-3 medium, level 4 easy: the paper's one hard, two medium, one easy).

Everything a rerun needs is in the journal (``<output>/work/journal.jsonl``): every answer, stage 1
included, is appended as it arrives under a key hashed from (stage, model, prompt version, subtask,
task, sample index, seed). A rerun after a kill skips what is there, and the stage-2 plan depends
only on the journaled stage-1 answers and the seed, so it ends with the same corpus. The corpus
(``samples.parquet``, ``manifest.json``, ``rejects.jsonl``) is rebuilt from the journal at the end.

With ``stage2: fields`` (models too small to write the JSON answer), stage 2 asks for one plain text
per request instead: the query, then its positive (given the query), then each level's negative
(given the query). Later requests depend on earlier answers, so the examples go in chunks (queries,
positives, negatives of one chunk, then the next) and each key also hashes the text it was given:
a rerun rebuilds the same plans from the journal and requests nothing twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from synth.answers import (
    DUPLICATE_POSITIVE,
    DUPLICATE_QUERY,
    EXAMPLE_SCHEMA,
    NEGATIVE_EQUALS_POSITIVE,
    NEGATIVE_EQUALS_QUERY,
    QUERY_EQUALS_POSITIVE,
    TASKS_SCHEMA,
    Example,
    Rejected,
    parse_example,
    parse_field,
    parse_tasks,
    same_text,
    validate_example,
)
from synth.corpus import SYNTH_SUBTASKS, Corpus, RowBuilder, check_output_folder, write_corpus
from synth.journal import Journal
from synth.llm import ChatClient, EndpointError, Usage
from synth.locks import exclusive
from synth.server import local_server
from synth.synth_config import SynthConfig, SynthConfigError
from synth.templates import LEVELS, FieldPrompts, PromptSet, text_sha256

Stage = Literal["brainstorm", "generate", "query", "positive", "negative"]
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "generate.lock"
REJECTS_FILE = "rejects.jsonl"


@dataclass(frozen=True)
class Request:
    stage: Stage
    subtask: str
    index: int
    task: str | None
    prompt: str  # the template version
    key: str
    messages: list[dict[str, str]] = field(compare=False, hash=False)
    level: int | None = None  # a `stage2: fields` negative's level
    echoes: tuple[str, ...] = field(default=(), compare=False, hash=False)  # see parse_field
    given: tuple[str, ...] = field(
        default=(), compare=False, hash=False
    )  # texts a `fields` request was given

    @property
    def seed(self) -> int:
        """Per-request sampling seed for endpoints that honour one (derived from the key)."""
        return int(self.key[:8], 16)


@dataclass(frozen=True)
class Endpoint:
    """Where requests go, resolved from the config, the environment or the local server."""

    base_url: str | None
    model: str
    model_id: str  # what the request keys and the manifest name (a packaged name, not a cache path)
    api_key: str
    extra_body: dict[str, Any]


@dataclass
class RunState:
    """What this invocation did; live counters for the progress bar and totals for the manifest."""

    usage: Usage
    rejects: Counter[str] = field(default_factory=Counter)
    answered: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # failed requests by EndpointError.kind
    last_error: str | None = None
    retries: int = 0
    stopped: str | None = None
    deadline: float | None = None  # time.monotonic() after which no new request starts


def request_key(
    stage: Stage,
    model_id: str,
    prompt: str,
    subtask: str,
    task: str | None,
    index: int,
    seed: int,
    *context: object,
) -> str:
    """The journal key; ``context`` (the text a `fields` request was given, its level) joins the hash."""
    payload = json.dumps(
        [stage, model_id, prompt, subtask, task, index, seed, *context], ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def subtasks_of(config: SynthConfig) -> list[str]:
    return [s for s in SYNTH_SUBTASKS if config.tasks.examples.get(s, 0) > 0]


def task_kind(subtask: str) -> str:
    return "symmetric" if subtask == "sts" else "asymmetric"


def brainstorm_plan(config: SynthConfig, prompts: PromptSet, model_id: str) -> list[Request]:
    return [
        Request(
            stage="brainstorm",
            subtask=subtask,
            index=i,
            task=None,
            prompt=prompts.brainstorm,
            key=request_key(
                "brainstorm", model_id, prompts.brainstorm, subtask, None, i, config.tasks.seed
            ),
            messages=prompts.brainstorm_messages(subtask),
        )
        for subtask in subtasks_of(config)
        for i in range(config.tasks.brainstorm_requests)
    ]


def task_pools(
    config: SynthConfig, stage1: list[Request], journal: dict[str, dict[str, Any]]
) -> dict[str, list[str]]:
    """Unique task descriptions per subtask: the given ones, then the brainstormed ones in plan
    order (not arrival order, so the pool is the same whatever order answers came in)."""
    pools: dict[str, list[str]] = {
        s: list(dict.fromkeys(config.tasks.given.get(s, []))) for s in subtasks_of(config)
    }
    for request in stage1:
        record = journal.get(request.key)
        if record is None:
            continue
        try:
            tasks = parse_tasks(
                record["content"],
                config.validation,
                truncated=record.get("finish_reason") == "length",
            )
        except Rejected:
            continue
        seen = {t.casefold() for t in pools[request.subtask]}
        pools[request.subtask] += [
            t for t in tasks if t.casefold() not in seen and not seen.add(t.casefold())
        ]
    return pools


def generate_plan(
    config: SynthConfig, prompts: PromptSet, model_id: str, pools: dict[str, list[str]]
) -> list[Request]:
    """Stage-2 requests: tasks drawn with replacement from each pool by a per-subtask seeded RNG,
    interleaved across subtasks so a run stopped by its budget still covers every subtask."""
    plan = []
    for subtask, pool in pools.items():
        if not pool:
            continue
        rng = random.Random(f"{config.tasks.seed}/{subtask}")
        for i in range(config.tasks.examples[subtask]):
            task = rng.choice(pool)
            plan.append(
                Request(
                    stage="generate",
                    subtask=subtask,
                    index=i,
                    task=task,
                    prompt=prompts.generate,
                    key=request_key(
                        "generate", model_id, prompts.generate, subtask, task, i, config.tasks.seed
                    ),
                    messages=prompts.generate_messages(subtask, task),
                )
            )
    return sorted(plan, key=lambda r: (r.index, SYNTH_SUBTASKS.index(r.subtask)))


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


def response_format(config: SynthConfig, stage: Stage) -> dict[str, Any] | None:
    mode = config.endpoint.response_format
    if stage in ("query", "positive", "negative"):
        return None  # plain text
    if mode == "json_schema":
        return TASKS_SCHEMA if stage == "brainstorm" else EXAMPLE_SCHEMA
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def check_answer(config: SynthConfig, request: Request, record: dict[str, Any]) -> Rejected | None:
    truncated = record.get("finish_reason") == "length"
    try:
        if request.stage == "brainstorm":
            parse_tasks(record["content"], config.validation, truncated=truncated)
        elif request.stage == "generate":
            parse_example(record["content"], config.validation, truncated=truncated)
        else:
            field_answer(config, request, record)
    except Rejected as e:
        return e
    return None


@contextmanager
def open_endpoint(config: SynthConfig) -> Iterator[Endpoint]:
    """The configured endpoint, or a local server started now and stopped when the block exits."""
    sampling = config.sampling
    if config.server is not None:
        with local_server(config.server, log_dir=config.work_dir) as server:
            yield Endpoint(
                base_url=server.base_url,
                model=server.model,
                model_id=config.server.model,
                api_key="local",  # transformers serve checks no key
                extra_body={
                    **server.sampling_body(sampling.temperature, sampling.top_p),
                    **config.endpoint.extra_body,
                },
            )
        return
    model = config.endpoint.model
    if not model:
        raise SynthConfigError("endpoint.model is required unless `server` starts a local model")
    api_key = os.environ.get(config.endpoint.api_key_env)
    if not api_key:
        raise SynthConfigError(
            f"no API key: set the environment variable {config.endpoint.api_key_env} "
            "(endpoint.api_key_env names it; the key is never read from the config file)"
        )
    yield Endpoint(
        base_url=config.endpoint.base_url or os.environ.get("OPENAI_BASE_URL"),
        model=model,
        model_id=model,
        api_key=api_key,
        extra_body=dict(config.endpoint.extra_body),
    )


class _Progress:
    """One bar per stage with requests done/total, rejects, tokens, cost, token rate and ETA."""

    def __init__(
        self, config: SynthConfig, state: RunState, enabled: bool, console: Console | None
    ) -> None:
        self._config, self._state = config, state
        self._start_tokens = state.usage.total_tokens
        self._t0 = time.monotonic()
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rejects {task.fields[rejects]}"),
            TextColumn("{task.fields[tokens]:,} tok"),
            TextColumn("${task.fields[cost]:.4f}"),
            TextColumn("{task.fields[rate]:.1f} tok/s"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def stage(self, name: str, total: int, done: int) -> Callable[[], None]:
        """The bar of ``name`` (a stage run in chunks keeps one bar; its totals grow)."""
        if name in self._tasks:
            task = self._tasks[name]
            now = self._bar.tasks[self._bar.task_ids.index(task)]
            self._bar.update(task, total=(now.total or 0) + total, completed=now.completed + done)
        else:
            task = self._tasks[name] = self._bar.add_task(
                name, total=total, completed=done, **self._fields()
            )

        def advance() -> None:
            self._bar.update(task, advance=1, **self._fields())

        return advance

    def _fields(self) -> dict[str, Any]:
        usage = self._state.usage
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        return {
            "rejects": sum(self._state.rejects.values()),
            "tokens": usage.total_tokens,
            "cost": usage.cost(self._config.budget),
            "rate": (usage.total_tokens - self._start_tokens) / elapsed,
        }


async def _run_requests(
    requests: list[Request],
    config: SynthConfig,
    client: ChatClient,
    writer: Any,
    state: RunState,
    advance: Callable[[], None],
) -> None:
    """Send ``requests`` with ``config.concurrency`` in flight; journal each answer at once."""
    pending = iter(requests)

    async def worker() -> None:
        for request in pending:  # one shared iterator: each request is taken by one worker
            if state.usage.exhausted(config.budget):
                state.stopped = (
                    f"token budget of {config.budget.max_tokens:,} reached"
                    " (raise budget.max_tokens to go on)"
                )
            elif state.deadline is not None and time.monotonic() > state.deadline:
                state.stopped = (
                    f"time budget of {config.budget.max_seconds:.0f}s reached (run again to go on)"
                )
            if state.stopped:
                return
            try:
                answer = await client.complete(
                    request.messages,
                    max_tokens=config.sampling.brainstorm_max_tokens
                    if request.stage == "brainstorm"
                    else config.sampling.generate_max_tokens,
                    temperature=config.sampling.temperature,
                    top_p=config.sampling.top_p,
                    seed=request.seed,
                    response_format=response_format(config, request.stage),
                )
            except EndpointError as e:
                if e.fatal:
                    raise
                state.failed += 1  # not journaled: a rerun tries it again
                state.failures[e.kind] += 1
                state.last_error = str(e)
                continue
            record = {
                "key": request.key,
                "stage": request.stage,
                "subtask": request.subtask,
                "index": request.index,
                "task": request.task,
                "prompt": request.prompt,
                **({"level": request.level} if request.level is not None else {}),
                "content": answer.content,
                "finish_reason": answer.finish_reason,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
                **({"usage_estimated": True} if answer.usage_estimated else {}),
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            writer.append(record)
            state.answered += 1
            rejected = check_answer(config, request, record)
            if rejected is not None:
                state.rejects[rejected.reason] += 1
            advance()

    workers = [asyncio.ensure_future(worker()) for _ in range(config.concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def _stage(
    name: str,
    plan: list[Request],
    config: SynthConfig,
    endpoint: Endpoint,
    journal: Journal,
    state: RunState,
    progress: _Progress,
) -> None:
    if not plan:
        return
    done = journal.read()
    todo = [r for r in plan if r.key not in done]
    advance = progress.stage(name, total=len(plan), done=len(plan) - len(todo))
    if not todo:
        return
    client = ChatClient(
        config.endpoint,
        base_url=endpoint.base_url,
        model=endpoint.model,
        api_key=endpoint.api_key,
        usage=state.usage,
        extra_body=endpoint.extra_body,
    )
    try:
        with journal.open() as writer:
            await _run_requests(todo, config, client, writer, state, advance)
    finally:
        state.retries += client.retries
        await client.close()


def journal_usage(records: dict[str, dict[str, Any]]) -> Usage:
    usage = Usage()
    for r in records.values():
        usage.add(
            int(r.get("prompt_tokens") or 0),
            int(r.get("completion_tokens") or 0),
            estimated=bool(r.get("usage_estimated")),
        )
    return usage


@dataclass(frozen=True)
class GenerateResult:
    corpus: Corpus
    complete: bool  # every planned request answered (no failures, no budget stop)


def generate(
    config: SynthConfig, *, progress: bool = True, console: Console | None = None
) -> GenerateResult:
    """Run (or resume) both stages, then build the corpus from the journal. One run per output
    folder at a time: a second one stops at once, naming the first (:mod:`synth.locks`)."""
    check_output_folder(config.output, "output")
    with exclusive(config.work_dir / LOCK_FILE, f"synth generate into {config.output}"):
        return _generate(config, progress=progress, console=console)


def _generate(config: SynthConfig, *, progress: bool, console: Console | None) -> GenerateResult:
    t0 = time.monotonic()
    prompts = PromptSet(config.prompts.brainstorm, config.prompts.generate, config.prompts.subtasks)
    fields = (
        FieldPrompts(config.prompts.fields, config.prompts.subtasks)
        if config.stage2 == "fields"
        else None
    )
    journal = Journal(config.work_dir / JOURNAL_FILE)
    state = RunState(usage=journal_usage(journal.read()))
    if config.budget.max_seconds is not None:
        state.deadline = t0 + config.budget.max_seconds
    with open_endpoint(config) as endpoint, _Progress(config, state, progress, console) as bar:
        stage1 = brainstorm_plan(config, prompts, endpoint.model_id)
        asyncio.run(_stage("stage 1 brainstorm", stage1, config, endpoint, journal, state, bar))
        stage1_done = all(r.key in journal.read() for r in stage1)
        stage2: list[Request] = []
        pools: dict[str, list[str]] = {}
        if stage1_done:
            pools = task_pools(config, stage1, journal.read())
            stage2 = generate_plan(config, prompts, endpoint.model_id, pools)
            if state.stopped is None and fields is not None:
                _run_fields(stage2, fields, config, endpoint, journal, state, bar)
            elif state.stopped is None:
                asyncio.run(
                    _stage("stage 2 examples", stage2, config, endpoint, journal, state, bar)
                )
        elif state.stopped is None:
            state.stopped = "stage 1 incomplete (failed requests; run again to retry them)"
    records = journal.read()
    state.usage = journal_usage(records)  # the corpus' whole cost, all runs together
    if fields is None:
        requests, candidates = stage2, json_candidates(config, stage2, records)
    else:
        examples = field_examples(config, fields, endpoint.model_id, stage2, records)
        requests = [r for ex in examples for r in ex.requests()]
        candidates = field_candidates(config, examples, records)
    complete = stage1_done and all(r.key in records for r in requests)
    corpus = build_corpus(
        config,
        prompts,
        endpoint,
        stage1,
        requests,
        candidates,
        pools,
        records,
        state,
        seconds=time.monotonic() - t0,
        complete=complete,
    )
    return GenerateResult(corpus=corpus, complete=complete)


def _run_fields(
    examples: list[Request],
    fields: FieldPrompts,
    config: SynthConfig,
    endpoint: Endpoint,
    journal: Journal,
    state: RunState,
    bar: _Progress,
) -> None:
    """Stage 2 one text per request, in chunks of examples: queries, positives, then negatives,
    each step repeated while rejected texts have attempts left."""
    size = max(16, 4 * config.concurrency)
    for start in range(0, len(examples), size):
        for step in ("query", "positive", "negative"):
            for _ in range(config.stage2_attempts):
                records = journal.read()
                planned = field_examples(
                    config, fields, endpoint.model_id, examples[start : start + size], records
                )
                plan = [r for ex in planned for r in ex.requests() if r.stage == step]
                if all(r.key in records for r in plan):
                    break
                asyncio.run(
                    _stage(f"stage 2 {step} texts", plan, config, endpoint, journal, state, bar)
                )
                if state.stopped is not None:
                    return


# (request, its example or why not, the raw answer, whether it settles an example: a rejected
# `fields` text that is asked again does not)
Candidate = tuple[Request, "Example | Rejected", str, bool]


def json_candidates(
    config: SynthConfig, stage2: list[Request], records: dict[str, dict[str, Any]]
) -> Iterator[Candidate]:
    """Each answered stage-2 request's example (one JSON answer each)."""
    for request in stage2:
        record = records.get(request.key)
        if record is None:
            continue
        try:
            yield (
                request,
                parse_example(
                    record["content"],
                    config.validation,
                    truncated=record.get("finish_reason") == "length",
                ),
                record["content"],
                True,
            )
        except Rejected as e:
            yield request, e, record["content"], True


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


def build_corpus(
    config: SynthConfig,
    prompts: PromptSet,
    endpoint: Endpoint,
    stage1: list[Request],
    stage2: list[Request],
    candidates: Iterable[Candidate],
    pools: dict[str, list[str]],
    records: dict[str, dict[str, Any]],
    state: RunState,
    *,
    seconds: float,
    complete: bool,
) -> Corpus:
    """Validate every journaled answer of the plan, dedup, write the corpus and ``rejects.jsonl``."""
    rows, rejects = RowBuilder(), []
    reasons: Counter[str] = Counter()

    def reject(request: Request, reason: str, detail: str, raw: str) -> None:
        reasons[f"{request.stage}/{reason}"] += 1
        rejects.append(
            {
                "key": request.key,
                "stage": request.stage,
                "subtask": request.subtask,
                "index": request.index,
                "task": request.task,
                "reason": reason,
                "detail": detail,
                "raw": raw,
            }
        )

    for request in stage1:
        record = records.get(request.key)
        if record is not None and (error := check_answer(config, request, record)) is not None:
            reject(request, error.reason, error.detail, record["content"])
    queries: set[str] = set()
    positives: set[str] = set()
    resolved = 0  # examples with every answer in (accepted or not)
    for request, example, raw, settles in candidates:
        resolved += settles
        if isinstance(example, Rejected):
            reject(request, example.reason, example.detail, raw)
            continue
        if example.query in queries:
            reject(request, DUPLICATE_QUERY, "", raw)
            continue
        if example.positive in positives:
            reject(request, DUPLICATE_POSITIVE, "", raw)
            continue
        queries.add(example.query)
        positives.add(example.positive)
        assert request.task is not None
        rows.add(
            source="synthetic",
            task_kind=task_kind(request.subtask),
            subtask=request.subtask,
            instruction=request.task,
            query=example.query,
            positive=example.positive,
            negatives=example.negatives,
        )
    config.output.mkdir(parents=True, exist_ok=True)
    _write_jsonl(config.output / REJECTS_FILE, rejects)
    examples_planned = sum(config.tasks.examples[s] for s in pools if pools[s])
    times = sorted(r["time"] for r in records.values() if "time" in r)
    build = {
        "kind": "synthesis",
        "method": "MGH (two stages: brainstorm tasks, then query/positive/4 graded negatives)",
        "stage2": config.stage2,  # json: one JSON answer per example; fields: one text per request
        "endpoint": {
            "base_url": endpoint.base_url,
            "model": endpoint.model_id,
            "response_format": config.endpoint.response_format,
        },
        "local_server": config.server.model_dump() if config.server else None,
        "prompts": {
            **prompts.versions(),
            **(
                {
                    "fields": {
                        "version": config.prompts.fields,
                        "sha256": text_sha256(config.prompts.fields),
                    }
                }
                if config.stage2 == "fields"
                else {}
            ),
        },
        "sampling": config.sampling.model_dump(),
        "tasks": config.tasks.model_dump(),
        "concurrency": config.concurrency,
        "negative_levels": "neg_1 hard (most similar to the query), neg_2/neg_3 medium, neg_4 easy",
    }
    extra = {
        "requests": {
            "brainstorm": {
                "planned": len(stage1),
                "answered": sum(r.key in records for r in stage1),
            },
            "generate": {"planned": examples_planned, "answered": resolved},
            **(
                {
                    "texts": {
                        step: {
                            "planned": sum(r.stage == step for r in stage2),
                            "answered": sum(r.stage == step and r.key in records for r in stage2),
                        }
                        for step in ("query", "positive", "negative")
                    }
                }
                if config.stage2 == "fields"
                else {}
            ),
            "failed_this_run": state.failed,
            "failures_this_run": dict(sorted(state.failures.items())),
            "last_error": state.last_error,
            "retries_this_run": state.retries,
        },
        "task_pool_sizes": {subtask: len(pool) for subtask, pool in pools.items()},
        "rejects": dict(sorted(reasons.items())),
        "acceptance_rate": round(len(rows.rows) / resolved, 4) if resolved else None,
        "timing": {
            "this_run_s": round(seconds, 1),
            "first_answer": times[0] if times else None,
            "last_answer": times[-1] if times else None,
        },
        "stopped": state.stopped,
        "complete": complete,  # every planned request answered (else a rerun resumes it)
    }
    return write_corpus(
        rows.frame(),
        config.output,
        name=config.name,
        build=build,
        usage=state.usage.report(config.budget),
        extra=extra,
    )


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def summary_lines(result: GenerateResult) -> list[str]:
    """What a user wants to see after a run: rows, tokens and cost, rejects, and whether it is done."""
    m = result.corpus.manifest
    usage, requests = m["usage"], m["requests"]
    answered, planned = requests["generate"]["answered"], requests["generate"]["planned"]
    lines = [
        (
            f"{m['counts']['rows']} rows -> {result.corpus.path}  ({answered}/{planned} examples answered,"
            f" acceptance {m['acceptance_rate']})"
        ),
        (
            f"tokens {usage['total_tokens']:,} (in {usage['prompt_tokens']:,}, out {usage['completion_tokens']:,}),"
            f" estimated cost ${usage['estimated_cost_usd']:.4f}"
            + (f" (tokens {usage['token_count']})" if usage.get("estimated_requests") else "")
        ),
    ]
    if m["rejects"]:
        lines.append("rejects: " + ", ".join(f"{k} {v}" for k, v in m["rejects"].items()))
    if requests["failed_this_run"]:
        kinds = ", ".join(f"{k} {v}" for k, v in requests["failures_this_run"].items())
        lines.append(
            f"{requests['failed_this_run']} request(s) failed ({kinds}); "
            f"last error: {requests['last_error']}"
        )
    if not result.complete:
        lines.append(
            f"incomplete: {m['stopped'] or 'some requests failed (run again to retry them)'}"
        )
    return lines
