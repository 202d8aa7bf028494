"""The corpus contract shared by `synth` (writer) and `harness` (reader).

A corpus is a directory holding ``samples.parquet`` (one training example per row) and
``manifest.json`` (how it was built, counts, and the sha256 of ``samples.parquet``).
See DESIGN.md, "Corpus". Level 1 is the hardest negative (closest to the query),
level 4 the easiest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl

from synth import textfiles

SAMPLES_FILE = "samples.parquet"
MANIFEST_FILE = "manifest.json"
LEVELS = (1, 2, 3, 4)
NEG_COLUMNS = tuple(f"neg_{level}" for level in LEVELS)
TASK_KINDS = ("asymmetric", "symmetric", "retrieval")
SYNTH_SUBTASKS = ("short-long", "long-short", "short-short", "long-long", "sts")
SYNTHETIC_SOURCE = "synthetic"  # the ``source`` of every MGH row (`synth generate`; DESIGN.md)

SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "source": pl.String(),
    "task_kind": pl.String(),
    "subtask": pl.String(),
    "instruction": pl.String(),
    "query": pl.String(),
    "positive": pl.String(),
    **{col: pl.String() for col in NEG_COLUMNS},
}
REQUIRED_NON_NULL = ("id", "source", "task_kind", "subtask", "instruction", "query", "positive")
# Optional columns, written by `synth verify` (synth/verify.py) so its changes can be undone: the
# row's negatives in their original level order and the teacher's cosine scores. Other readers
# ignore them; a corpus without them is unchanged (same file, same hash).
VERIFY_COLUMNS: dict[str, pl.DataType] = {
    "verify_original": pl.List(pl.String()),  # neg_1..neg_4 as they were before verification
    "verify_scores": pl.List(pl.Float64()),  # teacher cos(query, negative), original level order
    "verify_positive": pl.Float64(),  # teacher cos(query, positive)
}


class CorpusError(ValueError):
    """A corpus on disk does not follow the contract; the message says what and where."""


def row_id(instruction: str, query: str, positive: str, negatives: Iterable[str | None]) -> str:
    """Stable content hash of one example (16 hex chars of sha256)."""
    h = hashlib.sha256()
    for part in (instruction, query, positive, *negatives):
        h.update(b"\x00" if part is None else part.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Corpus:
    """A loaded, verified corpus: the rows, the manifest and the content hash."""

    frame: pl.DataFrame
    manifest: dict[str, Any]
    sha256: str
    path: Path | None = None

    def __len__(self) -> int:
        return self.frame.height

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.path.name if self.path else "corpus"))


def validate_frame(frame: pl.DataFrame, where: str = "corpus") -> pl.DataFrame:
    """Check columns, types and values; return the frame with the canonical column order."""
    missing = [c for c in SCHEMA if c not in frame.columns]
    if missing:
        raise CorpusError(
            f"{where}: missing column(s) {', '.join(missing)}; a corpus needs {', '.join(SCHEMA)}"
        )
    wrong = [
        f"{c} is {frame.schema[c]}"
        for c in SCHEMA
        if frame.schema[c] not in (pl.String(), pl.Null())
    ]
    if wrong:
        raise CorpusError(f"{where}: columns must be strings: {'; '.join(wrong)}")
    optional = [c for c in VERIFY_COLUMNS if c in frame.columns]
    try:
        frame = frame.select(
            [pl.col(c).cast(pl.String) for c in SCHEMA]
            + [pl.col(c).cast(VERIFY_COLUMNS[c]) for c in optional]
        )
    except pl.exceptions.PolarsError as e:
        raise CorpusError(f"{where}: columns {', '.join(optional)}: {e}") from None
    for col in REQUIRED_NON_NULL:
        bad = frame.filter(pl.col(col).is_null() | (pl.col(col).str.strip_chars() == ""))
        if (
            col == "instruction"
        ):  # an empty instruction is allowed (symmetric data sets); null is not
            bad = frame.filter(pl.col(col).is_null())
        if bad.height:
            first = bad.row(0, named=True).get("id")
            raise CorpusError(
                f"{where}: column {col!r} is empty in {bad.height} row(s) (first id: {first})"
            )
    # a missing negative is null; an empty one would be trained and scored as a text (the
    # held-out ranking beats "" at once, so recall@1 rises with no learning)
    blank = [
        (col, frame.filter(pl.col(col).is_not_null() & (pl.col(col).str.strip_chars() == "")))
        for col in NEG_COLUMNS
    ]
    blank = [(col, bad) for col, bad in blank if bad.height]
    if blank:
        where_blank = "; ".join(
            f"{col} in {bad.height} row(s) (first id: {bad['id'][0]})" for col, bad in blank
        )
        raise CorpusError(
            f"{where}: empty or whitespace negatives: {where_blank}; "
            "a missing negative must be null, not an empty text"
        )
    kinds = set(frame["task_kind"].unique().to_list()) - set(TASK_KINDS)
    if kinds:
        raise CorpusError(
            f"{where}: unknown task_kind {sorted(kinds)}; expected one of {TASK_KINDS}"
        )
    dup = frame.height - frame["id"].n_unique()
    if dup:
        raise CorpusError(f"{where}: {dup} duplicate id(s)")
    return frame


def level_counts(frame: pl.DataFrame) -> dict[str, int]:
    return {col: int(frame[col].is_not_null().sum()) for col in NEG_COLUMNS}


def summarize(frame: pl.DataFrame) -> dict[str, Any]:
    """Counts per task kind, subtask and negative level, for the manifest."""

    def counts(col: str) -> dict[str, int]:
        vc = frame[col].value_counts(sort=True)
        return {str(k): int(v) for k, v in zip(vc[col].to_list(), vc["count"].to_list())}

    return {
        "rows": frame.height,
        "task_kind": counts("task_kind"),
        "subtask": counts("subtask"),
        "source": counts("source"),
        "negatives_per_level": level_counts(frame),
    }


def check_output_folder(
    path: str | os.PathLike[str],
    what: str = "--out",
    why: str = "the corpus is written as a folder",
) -> Path:
    """Refuse, before any work, an output that cannot become a folder: a file, under one, or in a
    folder nothing can be created in (tried for real: the permission bits do not bind root).

    Args:
        what: the option or field that named ``path``, for the message.
        why: why it must be a folder, for the message.
    """
    from synth.outputs import check_can_be_folder

    path = Path(path)
    check_can_be_folder(path, what, why=why, error=CorpusError)
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; the manifest is as readable as the parquet beside it
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def samples_bytes(frame: pl.DataFrame, where: str = "corpus") -> tuple[pl.DataFrame, bytes]:
    """``frame`` validated and sorted by id, and the bytes of its ``samples.parquet`` (what
    :func:`write_corpus` writes, so their sha256 is the manifest's)."""
    frame = validate_frame(frame, where=where).sort("id")
    buffer = io.BytesIO()
    frame.write_parquet(buffer, compression="zstd", statistics=False)
    return frame, buffer.getvalue()


def write_corpus(
    frame: pl.DataFrame,
    directory: str | os.PathLike[str],
    *,
    name: str | None = None,
    build: Mapping[str, Any] | None = None,
    usage: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Corpus:
    """Validate ``frame`` and write ``samples.parquet`` + ``manifest.json`` atomically.

    ``build`` says how the corpus was made (endpoint model and prompt versions, or mining
    model and bands); ``usage`` holds token usage and cost. Rows are written sorted by id so
    the same content always gives the same file and hash.
    """
    directory = Path(directory)
    frame, data = samples_bytes(frame, where=str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    samples = directory / SAMPLES_FILE
    tmp = directory / f".{SAMPLES_FILE}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, samples)
    digest = hashlib.sha256(data).hexdigest()
    manifest: dict[str, Any] = {
        "name": name or directory.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "format_version": 1,
        "build": dict(build or {}),
        "counts": summarize(frame),
        "usage": dict(usage or {}),
        "samples_sha256": digest,
        **dict(extra or {}),
    }
    _atomic_write_text(
        directory / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    )
    return Corpus(frame=frame, manifest=manifest, sha256=digest, path=directory)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise CorpusError(f"{directory}: no {MANIFEST_FILE} (is this a corpus directory?)")
    try:
        manifest = textfiles.json_value(textfiles.read_text(path), str(path))
    except textfiles.TextFileError as e:  # not UTF-8, broken or too deeply nested JSON
        raise CorpusError(str(e)) from None
    if not isinstance(manifest, dict) or "samples_sha256" not in manifest:
        raise CorpusError(f"{path}: manifest has no 'samples_sha256'")
    return manifest


def read_corpus(directory: str | os.PathLike[str], *, verify: bool = True) -> Corpus:
    """Load a corpus directory; with ``verify`` the parquet's sha256 must match the manifest."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CorpusError(f"{directory}: corpus directory does not exist")
    manifest = read_manifest(directory)
    samples = directory / SAMPLES_FILE
    if not samples.is_file():
        raise CorpusError(f"{directory}: no {SAMPLES_FILE}")
    digest = sha256_file(samples)
    if verify and digest != manifest["samples_sha256"]:
        raise CorpusError(
            f"{samples}: sha256 {digest[:12]}… does not match the manifest's "
            f"{str(manifest['samples_sha256'])[:12]}… (the file changed after it was written; "
            "rebuild the corpus or restore the file)"
        )
    try:
        frame = pl.read_parquet(samples)
    except Exception as e:  # polars raises several types for truncated/corrupt files
        raise CorpusError(f"{samples}: cannot read parquet ({type(e).__name__}: {e})") from None
    frame = validate_frame(frame, where=str(samples))
    return Corpus(frame=frame, manifest=manifest, sha256=digest, path=directory)


@dataclass
class RowBuilder:
    """Collects rows in the corpus schema (used by mining, synthesis and tests)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self,
        *,
        source: str,
        task_kind: str,
        subtask: str,
        instruction: str,
        query: str,
        positive: str,
        negatives: Iterable[str | None] = (),
    ) -> None:
        negs = list(negatives)[:4]
        negs += [None] * (4 - len(negs))
        self.rows.append(
            {
                "id": row_id(instruction, query, positive, negs),
                "source": source,
                "task_kind": task_kind,
                "subtask": subtask,
                "instruction": instruction,
                "query": query,
                "positive": positive,
                **dict(zip(NEG_COLUMNS, negs)),
            }
        )

    def frame(self) -> pl.DataFrame:
        if not self.rows:
            return pl.DataFrame(schema=SCHEMA)
        return pl.DataFrame(self.rows, schema=SCHEMA).unique(
            "id", keep="first", maintain_order=True
        )
