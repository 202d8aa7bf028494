"""Readers for the data sets that ``synth mine`` starts from.

Each reader returns the (query, positive[, negative]) pairs of one data set and, for retrieval
collections, the documents that are candidates too. Three layouts:

- a JSON Lines file (or a folder holding ``<split>.jsonl``), one pair per line;
- a BEIR folder: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``; every qrel with
  a score above 0 is a (query, positive document) pair and the whole corpus is the pool;
- a Hugging Face data set by name, through ``datasets``, where the Hub can be reached.

Bad input raises :class:`SourceError` naming the file (and line) or the data set and the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synth import textfiles


class SourceError(ValueError):
    """A data set cannot be read as (query, positive[, negative]) pairs; the message says why."""


@dataclass(frozen=True)
class Pair:
    query: str
    positive: str
    negative: str | None = None


@dataclass(frozen=True)
class Columns:
    """Field names of a pair in a JSON Lines file or a Hugging Face data set."""

    query: str = "query"
    positive: str = "positive"
    negative: str | None = "negative"


@dataclass
class PairSet:
    """One data set: its pairs, plus documents that are candidates without being anyone's positive."""

    origin: str
    pairs: list[Pair]
    documents: list[str] = field(default_factory=list)


def _text(value: Any) -> str | None:
    """A stripped non-empty string, else None."""
    return (value.strip() or None) if isinstance(value, str) else None


def pairs_from_records(
    records: Iterable[tuple[str, Mapping[str, Any]]], columns: Columns
) -> list[Pair]:
    """Records ``(where, mapping)`` -> pairs; a missing or empty query/positive is an error at ``where``."""
    pairs = []
    for where, record in records:
        for name in (columns.query, columns.positive):
            if _text(record.get(name)) is None:
                state = "missing" if name not in record else "empty or not a string"
                raise SourceError(
                    f"{where}: field {name!r} is {state} (fields: {', '.join(record)})"
                )
        negative = _text(record.get(columns.negative)) if columns.negative else None
        pairs.append(Pair(_text(record[columns.query]), _text(record[columns.positive]), negative))  # type: ignore[arg-type]
    return pairs


def _jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        for where, record in textfiles.jsonl(path):
            if not isinstance(record, dict):
                raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record
    except textfiles.TextFileError as e:  # not UTF-8, broken or too deeply nested JSON
        raise SourceError(str(e)) from None


def read_jsonl_pairs(path: Path, columns: Columns) -> PairSet:
    pairs = pairs_from_records(_jsonl(path), columns)
    if not pairs:
        raise SourceError(f"{path}: no pairs")
    return PairSet(origin=str(path), pairs=pairs)


def read_beir(folder: Path, split: str) -> PairSet:
    qrels = folder / "qrels" / f"{split}.tsv"
    if not qrels.is_file():
        found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise SourceError(
            f"{qrels}: no qrels for split {split!r} (found: {', '.join(found) or 'none'})"
        )
    documents: dict[str, str] = {}
    for where, doc in _jsonl(folder / "corpus.jsonl"):
        text = " ".join(t for t in (_text(doc.get("title")), _text(doc.get("text"))) if t)
        if "_id" not in doc or not text:
            raise SourceError(
                f"{where}: a BEIR document needs '_id' and a non-empty 'title' or 'text'"
            )
        documents[str(doc["_id"])] = text
    queries_file = folder / "queries.jsonl"
    if not queries_file.is_file():
        raise SourceError(
            f"{queries_file}: missing (a BEIR folder needs corpus.jsonl, queries.jsonl, qrels/)"
        )
    queries = {str(q.get("_id")): _text(q.get("text")) for _, q in _jsonl(queries_file)}
    pairs = []
    try:
        rows = list(textfiles.tsv_rows(qrels))
    except textfiles.TextFileError as e:
        raise SourceError(str(e)) from None
    reader = iter(row for _, row in rows)
    header = next(reader, None)
    if header is None or len(header) < 3:
        raise SourceError(f"{qrels}: expected a header 'query-id, corpus-id, score'")
    for number, row in enumerate(reader, 2):
        if len(row) < 3:
            raise SourceError(f"{qrels}:{number}: expected 3 tab-separated fields, got {len(row)}")
        qid, did, score = row[:3]
        try:
            relevant = float(score) > 0
        except ValueError:
            raise SourceError(f"{qrels}:{number}: score {score!r} is not a number") from None
        if not relevant:
            continue
        if not queries.get(qid):
            raise SourceError(f"{qrels}:{number}: query id {qid!r} is not in {queries_file.name}")
        if did not in documents:
            raise SourceError(f"{qrels}:{number}: document id {did!r} is not in corpus.jsonl")
        pairs.append(Pair(queries[qid], documents[did]))  # type: ignore[arg-type]
    if not pairs:
        raise SourceError(f"{qrels}: no pairs with a positive score")
    return PairSet(origin=str(folder), pairs=pairs, documents=list(documents.values()))


def read_local(path: Path, split: str, columns: Columns) -> PairSet:
    """A JSON Lines file, a folder with ``<split>.jsonl``, or a BEIR folder."""
    if path.is_file():
        return read_jsonl_pairs(path, columns)
    if not path.is_dir():
        raise SourceError(f"{path}: no such file or folder")
    if (path / "corpus.jsonl").is_file():
        return read_beir(path, split)
    if (path / f"{split}.jsonl").is_file():
        return read_jsonl_pairs(path / f"{split}.jsonl", columns)
    raise SourceError(
        f"{path}: neither a BEIR folder (corpus.jsonl, queries.jsonl, qrels/{split}.tsv) "
        f"nor a folder with {split}.jsonl"
    )


def _hub_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail in seconds, not after minutes of retries, when the Hub cannot be reached."""
    import httpx
    from huggingface_hub import constants

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as e:
        raise SourceError(
            f"the Hugging Face Hub ({constants.ENDPOINT}) is unreachable ({type(e).__name__}); "
            "use a local copy (--source PATH), or set HF_HUB_OFFLINE=1 to use the datasets cache"
        ) from None


def read_hub(name: str, subset: str | None, split: str, columns: Columns) -> PairSet:
    """A Hugging Face data set by name. Offline (``HF_HUB_OFFLINE=1``) only the local cache is used."""
    offline = _hub_offline()
    if not offline:
        _check_hub_reachable()
    import datasets

    try:
        data = datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        hint = " (HF_HUB_OFFLINE is set: only cached data sets load)" if offline else ""
        raise SourceError(
            f"hf:{name}: cannot load split {split!r}{hint}: {type(e).__name__}: {e}"
        ) from None
    missing = [c for c in (columns.query, columns.positive) if c not in data.column_names]
    if missing:
        raise SourceError(
            f"hf:{name}: no column(s) {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(data.column_names)}); map them with 'columns:'"
        )
    records = ((f"hf:{name}[{split}] row {i}", r) for i, r in enumerate(data))
    return PairSet(origin=f"hf:{name}", pairs=pairs_from_records(records, columns))
