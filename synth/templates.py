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

_SUBTASK_KEYS = ("kind_name", "kind_description", "example", "query_spec", "positive_spec", "negative_spec")


class PromptError(ValueError):
    """A prompt version does not exist or lacks a field."""


@cache
def load_text(version: str) -> str:
    path = resources.files("synth") / "prompts" / f"{version}.txt"
    if not path.is_file():
        known = sorted(p.name[:-4] for p in (resources.files("synth") / "prompts").iterdir() if p.name.endswith(".txt"))
        raise PromptError(f"prompt version {version!r} not found in synth/prompts (known: {', '.join(known)})")
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
            raise PromptError(f"synth/prompts/{version}.txt: [{subtask}] lacks {', '.join(missing)}")
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
            for role, v in (("brainstorm", self.brainstorm), ("generate", self.generate), ("subtasks", self.subtasks))
        }

    @staticmethod
    def _user(version: str, values: dict[str, str]) -> list[dict[str, str]]:
        try:
            content = Template(load_text(version)).substitute(values)
        except KeyError as e:
            raise PromptError(f"synth/prompts/{version}.txt: unknown placeholder ${e.args[0]}") from None
        return [{"role": "user", "content": content.strip()}]
