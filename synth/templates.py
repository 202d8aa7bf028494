"""Versioned prompt templates for MGH synthesis (``synth/prompts/*.txt``).

Prompts live as text files, never as strings in code, so a prompt change is a new file
(``generate_v2.txt``) and a new version in the manifest and in every request key. Templates use
``string.Template`` placeholders (``$task``) because the prompts themselves are full of JSON braces.
The per-subtask wording (lengths, styles) is an INI file, ``subtasks_vN.txt``.
"""

from __future__ import annotations

import configparser
import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from string import Template

from synth.corpus import SYNTH_SUBTASKS

_SUBTASK_KEYS = (
    "kind_name",
    "kind_description",
    "example",
    "query_spec",
    "positive_spec",
    "negative_spec",
)


class PromptError(ValueError):
    """A prompt version does not exist or lacks a field."""


@cache
def load_text(version: str) -> str:
    path = resources.files("synth") / "prompts" / f"{version}.txt"
    if not path.is_file():
        known = sorted(
            p.name[:-4]
            for p in (resources.files("synth") / "prompts").iterdir()
            if p.name.endswith(".txt")
        )
        raise PromptError(
            f"prompt version {version!r} not found in synth/prompts (known: {', '.join(known)})"
        )
    return path.read_text(encoding="utf-8")


def text_sha256(version: str) -> str:
    return hashlib.sha256(load_text(version).encode("utf-8")).hexdigest()


@cache
def subtask_specs(version: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(load_text(version), source=f"synth/prompts/{version}.txt")
    specs: dict[str, dict[str, str]] = {}
    for subtask in SYNTH_SUBTASKS:
        if not parser.has_section(subtask):
            raise PromptError(f"synth/prompts/{version}.txt: no section [{subtask}]")
        missing = [k for k in _SUBTASK_KEYS if not parser.has_option(subtask, k)]
        if missing:
            raise PromptError(
                f"synth/prompts/{version}.txt: [{subtask}] lacks {', '.join(missing)}"
            )
        specs[subtask] = {k: parser.get(subtask, k) for k in _SUBTASK_KEYS}
    return specs


@dataclass(frozen=True)
class PromptSet:
    """The three template versions a run uses; renders chat messages for both stages."""

    brainstorm: str
    generate: str
    subtasks: str

    def brainstorm_messages(self, subtask: str) -> list[dict[str, str]]:
        return self._user(self.brainstorm, subtask_specs(self.subtasks)[subtask])

    def generate_messages(self, subtask: str, task: str) -> list[dict[str, str]]:
        return self._user(self.generate, {**subtask_specs(self.subtasks)[subtask], "task": task})

    def versions(self) -> dict[str, dict[str, str]]:
        """Version name and content hash of each template, for the manifest."""
        return {
            role: {"version": v, "sha256": text_sha256(v)}
            for role, v in (
                ("brainstorm", self.brainstorm),
                ("generate", self.generate),
                ("subtasks", self.subtasks),
            )
        }

    @staticmethod
    def _user(version: str, values: dict[str, str]) -> list[dict[str, str]]:
        try:
            content = Template(load_text(version)).substitute(values)
        except KeyError as e:
            raise PromptError(
                f"synth/prompts/{version}.txt: unknown placeholder ${e.args[0]}"
            ) from None
        return [{"role": "user", "content": content.strip()}]


FIELD_STEPS = ("query", "positive", "negative")
LEVELS = (1, 2, 3, 4)


@cache
def field_templates(version: str) -> tuple[dict[str, str], dict[int, str]]:
    """The one-text-per-request templates (``fields_vN.txt``): per step, and the level wordings."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(load_text(version), source=f"synth/prompts/{version}.txt")
    missing = [s for s in (*FIELD_STEPS, "levels") if not parser.has_section(s)]
    if missing:
        raise PromptError(f"synth/prompts/{version}.txt: no section(s) {', '.join(missing)}")
    steps = {}
    for step in FIELD_STEPS:
        if not parser.has_option(step, "template"):
            raise PromptError(f"synth/prompts/{version}.txt: [{step}] lacks template")
        steps[step] = parser.get(step, "template")
    levels = {}
    for level in LEVELS:
        if not parser.has_option("levels", str(level)):
            raise PromptError(f"synth/prompts/{version}.txt: [levels] lacks {level}")
        levels[level] = parser.get("levels", str(level))
    return steps, levels


@dataclass(frozen=True)
class FieldPrompts:
    """Renders the ``stage2: fields`` requests: a query, its positive, each level's negative."""

    fields: str
    subtasks: str

    def values(
        self, subtask: str, task: str, query: str | None = None, level: int | None = None
    ) -> dict[str, str]:
        values = {**subtask_specs(self.subtasks)[subtask], "task": task}
        if query is not None:
            values["query"] = query
        if level is not None:
            values["level_spec"] = field_templates(self.fields)[1][level]
        return values

    def messages(
        self, step: str, subtask: str, task: str, query: str | None = None, level: int | None = None
    ) -> list[dict[str, str]]:
        template = field_templates(self.fields)[0][step]
        try:
            content = Template(template).substitute(self.values(subtask, task, query, level))
        except KeyError as e:
            raise PromptError(
                f"synth/prompts/{self.fields}.txt: [{step}] uses unknown placeholder {e}"
            ) from None
        return [{"role": "user", "content": content}]

    def echoes(self, step: str, subtask: str, level: int | None = None) -> list[str]:
        """Prompt phrases an answer must not contain (a small model copies its instructions)."""
        specs = subtask_specs(self.subtasks)[subtask]
        spec = {"query": "query_spec", "positive": "positive_spec", "negative": "negative_spec"}[
            step
        ]
        phrases = [specs[spec], "answer with the text only"]
        if level is not None:
            phrases.append(field_templates(self.fields)[1][level])
        return [p.strip().rstrip(".") for p in phrases]
