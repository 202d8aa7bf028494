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

Here the requests run (endpoint, concurrency, budget, progress); the plan is :mod:`synth.plan`, the
``fields`` state machine :mod:`synth.fields`, the corpus built from the journal :mod:`synth.assemble`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from synth import outputs
from synth.assemble import (
    REJECTS_FILE,
    GenerateResult,
    build_corpus,
    check_answer,
    journal_usage,
    json_candidates,
)
from synth.corpus import MANIFEST_FILE, SAMPLES_FILE
from synth.fields import field_candidates, field_examples
from synth.journal import Journal
from synth.llm import ChatClient, EndpointError, Usage
from synth.locks import exclusive
from synth.plan import Request, brainstorm_plan, generate_plan, response_format, task_pools
from synth.server import local_server
from synth.synth_config import SynthConfig, SynthConfigError
from synth.templates import FieldPrompts, PromptSet

JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "generate.lock"
COMMAND = "synth generate"  # what outputs.MARKER records


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


def generate(
    config: SynthConfig, *, progress: bool = True, console: Console | None = None
) -> GenerateResult:
    """Run (or resume) both stages, then build the corpus from the journal. One run per output
    folder at a time: a second one stops at once, naming the first (:mod:`synth.locks`)."""
    _claim_output(config)
    with exclusive(config.work_dir / LOCK_FILE, f"synth generate into {config.output}"):
        return _generate(config, progress=progress, console=console)


def _claim_output(config: SynthConfig) -> None:
    """Refuse an output folder this command did not make (synth/outputs.py); resume into one it
    did. A synthesis begun before the marker existed is proven ours by its work folder, which
    holds only this command's files (journal, lock, server logs)."""
    entries = (config.work_dir.name, SAMPLES_FILE, MANIFEST_FILE, REJECTS_FILE)
    work = os.listdir(config.work_dir) if config.work_dir.is_dir() else []
    ours = (JOURNAL_FILE, LOCK_FILE, "transformers-serve-", f".{JOURNAL_FILE}.")
    proven = bool(work) and all(name.startswith(ours) for name in work)
    outputs.adopt(config.output, COMMAND, entries, proven)
    outputs.claim(config.output, COMMAND, entries, what="output")


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
