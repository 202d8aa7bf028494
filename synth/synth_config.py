"""The ``SYNTH.yaml`` schema for ``synth generate`` (MGH synthesis), validated before any request.

A mistyped key or a wrong type is an error naming the file and the field. Secrets never live here:
the API key is read from the environment variable named by ``endpoint.api_key_env`` at run time.
An example with every field: ``synth/data/local-smollm2.yaml``; for OpenAI / vLLM:
``synth/data/openai-example.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from synth.configfile import ConfigFileError, Strict, format_validation, read_with_extends
from synth.corpus import SYNTH_SUBTASKS

ResponseFormat = Literal["json_schema", "json_object", "none"]


class SynthConfigError(ConfigFileError):
    """A synthesis config is invalid; the message names the file and the field."""


class LocalServer(Strict):
    """Start ``transformers serve`` on 127.0.0.1 for a local model folder (the offline default)."""

    model: str = "packaged:smollm2-135m-instruct"
    device: str = "cpu"
    # Batch the requests in flight (paged attention; the README's "Synthesis" gives the speed-up
    # measured here). Off by default because, unbounded, it sizes its KV cache and masks from free
    # memory; bound it with extra_args (`--cb-num-blocks` counts pages of 256 tokens,
    # `--cb-max-batch-tokens` the tokens of one forward), as synth/data/local-smollm2.yaml does.
    continuous_batching: bool = False
    startup_timeout_s: float = Field(300.0, gt=0)
    extra_args: list[str] = Field(default_factory=list)


class Endpoint(Strict):
    """An OpenAI-compatible endpoint; unset values come from OPENAI_BASE_URL / the local server."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    response_format: ResponseFormat = "json_schema"
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)  # also the longest Retry-After honoured
    # Passed through unchanged in every request body (e.g. vLLM's `guided_decoding_backend`).
    extra_body: dict[str, object] = Field(default_factory=dict)


class Sampling(Strict):
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    brainstorm_max_tokens: int = Field(512, gt=0)
    generate_max_tokens: int = Field(640, gt=0)


class Budget(Strict):
    """Stop cleanly once this many tokens (prompt + completion, all runs together) are spent, or
    after ``max_seconds`` of requests in this run (a rerun resumes); the corpus is written either way."""

    max_tokens: int | None = Field(None, gt=0)
    max_seconds: float | None = Field(None, gt=0)
    price_per_1m_input: float = Field(0.0, ge=0)
    price_per_1m_output: float = Field(0.0, ge=0)


class Tasks(Strict):
    """How many stage-1 brainstorm requests and stage-2 examples to ask for, per subtask.

    ``given`` task descriptions join the brainstormed ones (first, in the given order); with
    ``brainstorm_requests: 0`` they are the whole pool (e.g. E5's fixed STS instruction).
    """

    brainstorm_requests: int = Field(2, ge=0)
    examples: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(SYNTH_SUBTASKS, 20))
    given: dict[str, list[str]] = Field(default_factory=dict)
    seed: int = 0

    @model_validator(mode="after")
    def _known_subtasks(self) -> Tasks:
        unknown = sorted((set(self.examples) | set(self.given)) - set(SYNTH_SUBTASKS))
        if unknown:
            raise ValueError(
                f"unknown subtask(s) {unknown}; expected some of {list(SYNTH_SUBTASKS)}"
            )
        if any(n < 0 for n in self.examples.values()):
            raise ValueError("example counts must be >= 0")
        if self.brainstorm_requests == 0:
            empty = [s for s, n in self.examples.items() if n > 0 and not self.given.get(s)]
            if empty:
                raise ValueError(f"brainstorm_requests is 0 and no `given` tasks for {empty}")
        return self


class Prompts(Strict):
    """Template versions under ``synth/prompts/`` (a changed prompt gets a new version)."""

    brainstorm: str = "brainstorm_v1"
    generate: str = "generate_v1"
    subtasks: str = "subtasks_v1"
    fields: str = "fields_v1"  # the one-text-per-request templates of `stage2: fields`


class Validation(Strict):
    max_chars: int = Field(2000, gt=0)  # longer texts are rejected as "too_long"
    min_chars: int = Field(3, ge=1)  # shorter ones as "too_short"
    # `fields` only: reject a text whose cosine to a phrase of its own prompt (the length spec, the
    # level's wording) is at least this, as "paraphrases_prompt" (copies in other words, which the
    # exact-phrase check misses). None: off. With all-MiniLM-L6-v2, rewordings of a spec score
    # 0.8-0.9 and on-topic texts under 0.2; 0.6 also catches texts about the instructions.
    prompt_similarity: float | None = Field(None, gt=0, le=1)
    similarity_model: str = "packaged:all-minilm-l6-v2"  # a sentence-transformers model


class SynthConfig(Strict):
    name: str
    output: Path  # the corpus folder; the journal and work files live in `<output>/work/`
    endpoint: Endpoint = Field(default_factory=Endpoint)
    server: LocalServer | None = None
    concurrency: int = Field(8, ge=1)
    # Stage 2 as one JSON answer per example (the paper's way, "json"), or one plain text per request
    # (query, then positive, then each level's negative: "fields") for models too small for JSON.
    stage2: Literal["json", "fields"] = "json"
    # `fields` only: a rejected text (copied instructions, equal to its query...) is asked again, with a
    # new sample, up to this many times in all before its example is rejected.
    stage2_attempts: int = Field(3, ge=1)
    sampling: Sampling = Field(default_factory=Sampling)
    budget: Budget = Field(default_factory=Budget)
    tasks: Tasks = Field(default_factory=Tasks)
    prompts: Prompts = Field(default_factory=Prompts)
    validation: Validation = Field(default_factory=Validation)

    @model_validator(mode="after")
    def _endpoint_or_server(self) -> SynthConfig:
        if self.server is not None and self.endpoint.base_url is not None:
            raise ValueError(
                "give either `server` (start a local model) or `endpoint.base_url`, not both"
            )
        return self

    @property
    def work_dir(self) -> Path:
        return self.output / "work"


def load_synth_config(path: str | os.PathLike[str], *, output: Path | None = None) -> SynthConfig:
    """Read and validate a SYNTH.yaml (it may ``extends:`` another, see :mod:`synth.configfile`); a
    relative ``output`` is relative to the working directory."""
    path = Path(path)
    raw = read_with_extends(path, "synthesis config", SynthConfigError)
    if output is not None:
        raw["output"] = str(output)
    try:
        return SynthConfig.model_validate(raw)
    except ValidationError as e:
        raise SynthConfigError(format_validation(e, str(path))) from None
