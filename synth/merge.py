"""``synth merge``: one training corpus from several (the paper's synthetic MGH data plus the public
retrieval mix), in the same contract as its parts.

Each part is read and hash-checked; a weight below 1 keeps a seeded sample of that share of its
rows (a weight of 1 keeps them all; the paper does not say how it mixed, so the default is all of
everything). A row's identity is its content (:func:`synth.corpus.row_id` of its texts), not its
``id``: a row whose texts are already in the merge is a duplicate and kept once; a row of other
texts whose ``id`` an earlier part already uses (corpora made elsewhere number their rows) is kept
under ``PART:id``. The manifest's
``build`` records every part's name, folder, ``samples_sha256``, rows, weight and rows kept, so the
merged corpus's hash, and with it every trial key, changes when a part changes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from synth import outputs
from synth.corpus import (
    NEG_COLUMNS,
    Corpus,
    CorpusError,
    read_corpus,
    write_corpus,
)

COMMAND = "synth merge"


class MergeError(ValueError):
    """Bad merge arguments; the message says which."""


def parse_weights(items: Sequence[str]) -> dict[str, float]:
    """``NAME=W`` items (``--weight synthetic=0.5``) as a mapping; W in (0, 1]."""
    weights: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not name or not 0 < weight <= 1:
            raise MergeError(
                f"--weight {item!r}: expected PART=W with 0 < W <= 1 (PART: a part's folder name)"
            )
        weights[name] = weight
    return weights


def merge_corpora(
    parts: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: Mapping[str, float] | None = None,
    seed: int = 0,
    name: str | None = None,
    force: bool = False,
) -> Corpus:
    """Merge the corpora in ``parts`` into ``out`` (see the module docstring); ``force`` replaces
    a corpus this command wrote at ``out`` (synth/outputs.py)."""
    if len(parts) < 2:
        raise MergeError("give at least two corpus folders to merge")
    out = outputs.check_output(out, COMMAND, inputs=parts, force=force)
    corpora = [read_corpus(p) for p in parts]
    names = [Path(p).resolve().name for p in parts]
    if len(set(names)) != len(names):
        raise MergeError(
            f"parts must have distinct folder names (weights and the manifest use them): {names}"
        )
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise MergeError(
            f"--weight names no part: {', '.join(unknown)} (parts: {', '.join(names)})"
        )

    frames: list[pl.DataFrame] = []
    recorded: list[dict[str, Any]] = []
    for part_name, path, corpus in zip(names, parts, corpora):
        weight = weights.get(part_name, 1.0)
        frame = corpus.frame
        if weight < 1:
            frame = frame.sample(max(1, round(weight * frame.height)), seed=seed).sort("id")
        frames.append(frame)
        recorded.append(
            {
                "name": part_name,
                "corpus": corpus.name,
                "path": str(Path(path).resolve()),
                "samples_sha256": corpus.sha256,
                "rows": len(corpus),
                "weight": weight,
                "kept": frame.height,
                "build_kind": corpus.manifest.get("build", {}).get("kind"),
            }
        )
    merged, duplicates, renamed = _distinct_rows(frames, names)
    if merged.height == 0:
        raise CorpusError("the merged corpus would have no rows")
    build = {
        "kind": "merge",
        "parts": recorded,
        "seed": seed,
        "duplicates_dropped": duplicates,
        "ids_renamed": renamed,
    }
    with outputs.replacing(out, COMMAND, inputs=parts, force=force) as staging:
        written = write_corpus(merged, staging, name=name or out.name, build=build)
    return dataclasses.replace(written, path=out)


def _distinct_rows(
    frames: Sequence[pl.DataFrame], names: Sequence[str]
) -> tuple[pl.DataFrame, int, int]:
    """The parts' rows, each content (the texts :func:`synth.corpus.row_id` hashes) once, first
    part first; how many rows were duplicates; how many kept rows found their ``id`` taken by an
    earlier row (they are now ``PART:id``)."""
    keyed = [frame.with_columns(pl.lit(part).alias("_part")) for frame, part in zip(frames, names)]
    # diagonal: a part verified by `synth verify` brings its verify_* columns, the others null
    rows = pl.concat(keyed, how="diagonal_relaxed")
    texts = ["instruction", "query", "positive", *NEG_COLUMNS]  # what row_id hashes
    distinct = rows.unique(subset=texts, keep="first", maintain_order=True)
    taken = ~distinct["id"].is_first_distinct()
    distinct = distinct.with_columns(
        pl.when(taken)
        .then(pl.col("_part") + ":" + pl.col("id"))
        .otherwise(pl.col("id"))
        .alias("id")
    )
    if distinct["id"].n_unique() != distinct.height:
        raise CorpusError("the merged corpus would repeat an id even after naming ids by part")
    return (
        distinct.drop("_part"),
        rows.height - distinct.height,
        int(taken.sum()),
    )
