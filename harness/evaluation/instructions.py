"""Which instruction a task's texts get, and on which side (see ``harness/data/instructions.yaml``).

E5-mistral and LLM2Vec give retrieval and reranking queries the task's instruction and embed
documents as they are; symmetric tasks (STS, classification, clustering, pair classification,
summarization) have no query side, so every text gets the instruction. mteb tells the encoder
which side it is encoding through ``prompt_type`` (query, document, or None for symmetric tasks).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import yaml
from mteb.types import PromptType

ALL_TASKS = "*"  # key of an override that applies to every task ("" turns instructions off)


@cache
def _builtin() -> dict[str, Any]:
    text = resources.files("harness").joinpath("data/instructions.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


@dataclass(frozen=True)
class Instructions:
    """The built-in list plus the experiment's ``eval.instructions`` overrides."""

    overrides: Mapping[str, str] = field(default_factory=dict)

    def for_task(self, task_name: str, task_type: str) -> str:
        """The instruction text for a task ("" = none)."""
        if task_name in self.overrides:
            return self.overrides[task_name]
        if ALL_TASKS in self.overrides:
            return self.overrides[ALL_TASKS]
        builtin = _builtin()
        if task_name in builtin["tasks"]:
            return builtin["tasks"][task_name]
        for prefix, text in builtin["prefixes"].items():
            if task_name.startswith(prefix):
                return text
        return builtin["types"].get(task_type) or builtin["fallback"].get(task_type, "")

    def for_input(
        self, task_name: str, task_type: str, prompt_type: PromptType | None
    ) -> str | None:
        """The instruction for one side of a task: documents get none."""
        if prompt_type == PromptType.document:
            return None
        return self.for_task(task_name, task_type) or None

    def fingerprint(self) -> str | None:
        """A short hash of the overrides (None without any), to keep cached results apart."""
        if not self.overrides:
            return None
        blob = json.dumps(dict(self.overrides), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]
