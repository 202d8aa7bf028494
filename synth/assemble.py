"""Turning the journal into the corpus: each answer checked, the examples validated and
deduplicated, ``samples.parquet`` + ``manifest.json`` + ``rejects.jsonl`` written, and the summary
a user sees after a run."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synth.answers import DUPLICATE_POSITIVE, DUPLICATE_QUERY, Rejected, parse_example, parse_tasks
from synth.corpus import SYNTHETIC_SOURCE, Corpus, RowBuilder, write_corpus
from synth.fields import Candidate, field_answer
from synth.llm import Usage
from synth.plan import Request, task_kind
from synth.synth_config import SynthConfig
from synth.templates import PromptSet, text_sha256

if TYPE_CHECKING:  # types only: synth.generate runs the requests and imports this module
    from synth.generate import Endpoint, RunState

REJECTS_FILE = "rejects.jsonl"


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

    @property
    def failed(self) -> bool:
        """No row passed validation: a failed run, however many requests were answered."""
        return len(self.corpus) == 0


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
            source=SYNTHETIC_SOURCE,
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
    if result.failed:
        why = ", ".join(f"{k} {v}" for k, v in m["rejects"].items()) or "no answers"
        lines.append(
            f"failed: no example passed validation ({why}); the answers are in "
            f"{result.corpus.path / REJECTS_FILE}"
        )
    return lines
