"""Request planning for ``synth generate``: the requests of each stage, their journal keys (hashed
so a rerun plans the same requests), the task pools stage 1 yields and the response format asked."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from synth.answers import EXAMPLE_SCHEMA, TASKS_SCHEMA, Rejected, parse_tasks
from synth.corpus import SYNTH_SUBTASKS
from synth.synth_config import SynthConfig
from synth.templates import PromptSet

Stage = Literal["brainstorm", "generate", "query", "positive", "negative"]


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


def response_format(config: SynthConfig, stage: Stage) -> dict[str, Any] | None:
    mode = config.endpoint.response_format
    if stage in ("query", "positive", "negative"):
        return None  # plain text
    if mode == "json_schema":
        return TASKS_SCHEMA if stage == "brainstorm" else EXAMPLE_SCHEMA
    if mode == "json_object":
        return {"type": "json_object"}
    return None
