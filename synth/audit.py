"""``synth audit``: are a corpus's negatives really graded from hard (level 1) to easy (level 4)?

An independent embedding model scores every row's query, positive and negatives. Per level the
audit reports the mean and spread of the cosine to the query and to the positive, and the share of
negatives the model scores above the positive (likely false negatives). Whether difficulty falls
from level 1 to 4 is measured two ways: the Spearman correlation between level and similarity to
the query over all (row, level) pairs (-1 = similarity always falls with the level), and whether
the per-level means fall strictly. This is the paper's check that hard negatives sit closer to the
query than easy ones. Results go to ``audit.json`` and ``audit.md`` in the corpus folder (outside
``samples.parquet``, so the corpus hash is unchanged).
"""

from __future__ import annotations

import json
import os
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import polars as pl
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from synth.corpus import LEVELS, NEG_COLUMNS, read_corpus
from synth.embed import DEFAULT_ENCODER, encode, load_encoder

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"


def _spread(values: torch.Tensor) -> dict[str, float]:
    return {"mean": round(float(values.mean()), 4), "std": round(float(values.std(correction=0)), 4)}


def _spearman(levels: list[int], sims: list[float]) -> float | None:
    if len(set(levels)) < 2:
        return None
    return round(float(spearmanr(levels, sims).statistic), 4)


def _falls(means: list[float]) -> bool:
    return len(means) >= 2 and all(a > b for a, b in pairwise(means))


def level_similarities(frame: pl.DataFrame, emb: torch.Tensor, index: dict[str, int]) -> dict[str, Any]:
    """Per-level statistics of one group of rows, given embeddings of every text in it."""
    query = emb[[index[t] for t in frame["query"]]]
    positive = emb[[index[t] for t in frame["positive"]]]
    positive_score = (query * positive).sum(dim=1)
    levels: dict[str, Any] = {}
    pairs_level: list[int] = []
    pairs_query: list[float] = []
    pairs_positive: list[float] = []
    for level, col in zip(LEVELS, NEG_COLUMNS):
        present = frame[col].is_not_null().to_torch()
        if not bool(present.any()):
            continue
        negative = emb[[index[t] for t in frame[col].drop_nulls()]]
        to_query = (query[present] * negative).sum(dim=1)
        to_positive = (positive[present] * negative).sum(dim=1)
        levels[str(level)] = {
            "count": int(present.sum()),
            "query": _spread(to_query),
            "positive": _spread(to_positive),
            "above_positive": round(float((to_query > positive_score[present]).float().mean()), 4),
        }
        pairs_level += [level] * len(to_query)
        pairs_query += to_query.tolist()
        pairs_positive += to_positive.tolist()
    return {
        "rows": frame.height,
        "positive_to_query": _spread(positive_score),
        "levels": levels,
        "spearman_query": _spearman(pairs_level, pairs_query),
        "spearman_positive": _spearman(pairs_level, pairs_positive),
        "monotone_query": _falls([lv["query"]["mean"] for lv in levels.values()]),
        "monotone_positive": _falls([lv["positive"]["mean"] for lv in levels.values()]),
    }


def audit_corpus(
    directory: str | os.PathLike[str],
    *,
    model: str = DEFAULT_ENCODER,
    max_rows: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Audit the corpus at ``directory``, write ``audit.json`` and ``audit.md`` there, return the report."""
    started = time.perf_counter()
    corpus = read_corpus(directory)
    frame = corpus.frame
    if max_rows is not None and frame.height > max_rows:
        frame = frame.sample(max_rows, seed=seed).sort("id")
    texts = list(dict.fromkeys(
        t for col in ("query", "positive", *NEG_COLUMNS) for t in frame[col].drop_nulls()
    ))
    encoder = load_encoder(model)
    emb = encode(encoder, texts, batch_size=batch_size, description="embedding", progress=progress)
    index = {t: i for i, t in enumerate(texts)}
    report = {
        "corpus": corpus.name,
        "path": str(Path(directory).resolve()),
        "samples_sha256": corpus.sha256,
        "model": model,
        "sampled_rows": frame.height if frame.height < len(corpus) else None,
        **level_similarities(frame, emb, index),
        "by_source": {
            str(name): level_similarities(group, emb, index)
            for (name,), group in frame.group_by("source", maintain_order=True)
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    directory = Path(directory)
    (directory / AUDIT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (directory / AUDIT_MD).write_text(render_markdown(report), encoding="utf-8")
    return report


def _fmt(spread: dict[str, float]) -> str:
    return f"{spread['mean']:.3f} ± {spread['std']:.3f}"


def _level_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = [["positive", str(report["rows"]), _fmt(report["positive_to_query"]), "1.000 ± 0.000", ""]]
    for level, s in report["levels"].items():
        rows.append([
            f"level {level}", str(s["count"]), _fmt(s["query"]), _fmt(s["positive"]),
            f"{100 * s['above_positive']:.1f}%",
        ])
    return rows


HEADER = ["", "n", "cos to query", "cos to positive", "scored above positive"]


def _verdict(report: dict[str, Any]) -> str:
    return (
        f"Spearman(level, cos to query) = {report['spearman_query']}, "
        f"(level, cos to positive) = {report['spearman_positive']}; "
        f"means fall from level 1 to 4: to query {'yes' if report['monotone_query'] else 'NO'}, "
        f"to positive {'yes' if report['monotone_positive'] else 'NO'}"
    )


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Audit of corpus `{report['corpus']}`",
        "",
        f"Model `{report['model']}`, {report['rows']} rows"
        + (" (a seeded sample)" if report["sampled_rows"] else "")
        + f", samples sha256 `{report['samples_sha256'][:12]}…`. Mean ± std of cosine similarity.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(row) + " |" for row in _level_rows(report)),
        "",
        _verdict(report) + ".",
        "",
        "## By source (mean cos to query per level)",
        "",
        "| source | rows | " + " | ".join(f"level {lv}" for lv in LEVELS) + " | Spearman | falls |",
        "|---|---|" + "---|" * (len(LEVELS) + 2),
    ]
    for name, s in report["by_source"].items():
        means = [f"{s['levels'][str(lv)]['query']['mean']:.3f}" if str(lv) in s["levels"] else "-" for lv in LEVELS]
        lines.append(
            f"| {name} | {s['rows']} | " + " | ".join(means)
            + f" | {s['spearman_query']} | {'yes' if s['monotone_query'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"audit of {report['corpus']} ({report['model']})")
    for name in HEADER:
        table.add_column(name, justify="left" if not name else "right")
    for row in _level_rows(report):
        table.add_row(*row)
    console.print(table)
    style = "green" if report["monotone_query"] else "red"
    console.print(f"[{style}]{_verdict(report)}[/{style}]")
    console.print(f"wrote {AUDIT_JSON} and {AUDIT_MD} in {report['path']}")
