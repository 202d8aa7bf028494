"""The mining config (``synth mine CONFIG`` or ``--source`` flags): its schema, defaults and
loading. Relative source paths resolve against ``data_root`` (which may use ``${VAR}``) or the
config file's folder; see :mod:`synth.mine` for what the settings do."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from synth.configfile import ConfigFileError, Strict, expand_env, format_validation, read_mapping
from synth.corpus import LEVELS
from synth.embed import DEFAULT_ENCODER

DEFAULT_BANDS = ((1, 10), (11, 30), (31, 100), (101, 300))
DEFAULT_INSTRUCTIONS = {
    "retrieval": "Given a query, retrieve relevant passages that answer the query",
    "symmetric": "Retrieve semantically similar text",
    "asymmetric": "Given a text, retrieve texts related to it",
}
HUB_PREFIX = "hf:"


class MineError(ConfigFileError):
    """A mining config is invalid; the message names the file and the field."""


class ColumnsConfig(Strict):
    """Field names in JSON Lines files and Hub data sets (BEIR folders have fixed names)."""

    query: str = "query"
    positive: str = "positive"
    negative: str | None = "negative"


class SourceConfig(Strict):
    path: str | None = None  # a .jsonl file, a folder with <split>.jsonl, or a BEIR folder
    hf: str | None = None  # a Hugging Face data set id
    subset: str | None = None  # the Hub data set's configuration name
    split: str = "train"
    name: str | None = None  # the rows' `source` and `subtask`; default: folder name or Hub id
    task_kind: Literal["retrieval", "symmetric", "asymmetric"] = "retrieval"
    instruction: str | None = None  # default: one per task kind (DEFAULT_INSTRUCTIONS)
    columns: ColumnsConfig = ColumnsConfig()
    max_rows: int | None = Field(
        None, ge=1
    )  # a seeded sample of the pairs (pair files: the pool too)

    @model_validator(mode="after")
    def _one_origin(self) -> SourceConfig:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of 'path' (local files) or 'hf' (a Hub data set)")
        return self

    @property
    def label(self) -> str:
        return self.name or (Path(self.path).name if self.path else str(self.hf))

    @property
    def resolved_instruction(self) -> str:
        return (
            self.instruction
            if self.instruction is not None
            else DEFAULT_INSTRUCTIONS[self.task_kind]
        )


class MineConfig(Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    name: str | None = None  # corpus name in the manifest; default: the output folder's name
    # Base folder for relative source paths; may use ${VAR} or ${VAR:-default}. Default: the
    # config file's folder (the current directory for --source flags).
    data_root: str | None = None
    model: str = DEFAULT_ENCODER
    bands: list[tuple[int, int]] = Field(default_factory=lambda: list(DEFAULT_BANDS))
    relative_margin: float = Field(0.05, ge=0, lt=1)
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    # Truncate texts for the encoder (tokens). all-MiniLM-L6-v2 was trained on 128 tokens; its
    # folder says 256. Long documents (BEIR abstracts) encode about twice as fast at 128.
    max_seq_length: int | None = Field(None, ge=8)

    @field_validator("bands")
    @classmethod
    def _ordered_bands(cls, bands: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if len(bands) != len(LEVELS):
            raise ValueError(f"need {len(LEVELS)} bands of ranks [first, last], one per level")
        previous = 0
        for level, (first, last) in enumerate(bands, 1):
            if not previous < first <= last:
                raise ValueError(
                    f"level {level} band [{first}, {last}] must start after rank {previous} "
                    "and end at or after its start (bands go from nearest to farthest, no overlap)"
                )
            previous = last
        return bands


def build_config(
    raw: Mapping[str, Any],
    *,
    where: str,
    base_dir: Path,
    overrides: Mapping[str, Any] | None = None,
) -> MineConfig:
    """Validate a raw mapping (plus CLI overrides) and make every source path absolute.

    ``max_rows`` in ``overrides`` applies to every source; other keys replace top-level fields.
    """
    raw = dict(raw)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    max_rows = overrides.pop("max_rows", None)
    raw.update(overrides)
    if max_rows is not None and isinstance(raw.get("sources"), list):
        raw["sources"] = [
            {**s, "max_rows": max_rows} if isinstance(s, dict) else s for s in raw["sources"]
        ]
    try:
        config = MineConfig.model_validate(raw)
    except ValidationError as e:
        raise MineError(format_validation(e, where)) from None
    root = base_dir
    if config.data_root is not None:
        root = base_dir / expand_env(config.data_root, f"{where}: data_root", MineError)
        if not root.is_dir():
            raise MineError(
                f"{where}: data_root {config.data_root!r} is {root}, which is not a folder "
                "(set the environment variable it names, or pass --data-root)"
            )
    for i, source in enumerate(config.sources):
        if source.path is not None:
            path = expand_env(source.path, f"{where}: sources.{i}.path", MineError)
            source.path = str((root / path).resolve())
    config.data_root = str(root.resolve())
    return config


def load_config(
    path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None
) -> MineConfig:
    """Read a mining YAML file; relative source paths are relative to ``data_root`` or the file."""
    path = Path(path)
    raw = read_mapping(path, "mining config", MineError)
    return build_config(raw, where=str(path), base_dir=path.resolve().parent, overrides=overrides)


def config_from_sources(
    sources: Sequence[str],
    *,
    task_kind: str = "retrieval",
    instruction: str | None = None,
    **overrides: Any,
) -> MineConfig:
    """The config for ``synth mine --source A --source B``: local paths or ``hf:NAME``."""
    raw_sources = [
        {"hf": s[len(HUB_PREFIX) :]} if s.startswith(HUB_PREFIX) else {"path": s} for s in sources
    ]
    for s in raw_sources:
        s.update(task_kind=task_kind, instruction=instruction)
    return build_config(
        {"sources": raw_sources}, where="--source", base_dir=Path.cwd(), overrides=overrides
    )
