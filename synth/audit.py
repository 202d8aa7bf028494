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
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import polars as pl
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from synth import outputs
from synth.corpus import LEVELS, NEG_COLUMNS, Corpus, read_corpus
from synth.embed import DEFAULT_ENCODER, encode, load_encoder

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"


def _spread(values: torch.Tensor) -> dict[str, float]:
    return {
        "mean": round(float(values.mean()), 4),
        "std": round(float(values.std(correction=0)), 4),
    }


def _spearman(levels: list[int], sims: list[float]) -> float | None:
    if len(set(levels)) < 2:
        return None
    return round(float(spearmanr(levels, sims).statistic), 4)


def _falls(means: list[float]) -> bool:
    return len(means) >= 2 and all(a > b for a, b in pairwise(means))


def text_embeddings(frame: pl.DataFrame, emb: torch.Tensor, index: dict[str, int]) -> RowEmbeddings:
    """Row-aligned embeddings of ``frame`` from one embedding per distinct text (every text embedded
    the same way, as an independent sentence encoder does)."""

    def rows(col: str) -> torch.Tensor:
        texts = frame[col].to_list()
        out = torch.zeros((frame.height, emb.shape[1]), dtype=emb.dtype)
        present = [i for i, t in enumerate(texts) if t is not None]
        if present:
            out[present] = emb[[index[texts[i]] for i in present]]
        return out

    return RowEmbeddings(rows("query"), rows("positive"), {col: rows(col) for col in NEG_COLUMNS})


@dataclass(frozen=True)
class RowEmbeddings:
    """Normalized embeddings aligned with a corpus frame's rows: query, positive and each level's
    negative (rows without that negative hold zeros and are skipped by its null in the frame)."""

    query: torch.Tensor
    positive: torch.Tensor
    negatives: dict[str, torch.Tensor]

    def select(self, rows: torch.Tensor) -> RowEmbeddings:
        return RowEmbeddings(
            self.query[rows], self.positive[rows], {c: e[rows] for c, e in self.negatives.items()}
        )


def level_similarities(frame: pl.DataFrame, emb: RowEmbeddings) -> dict[str, Any]:
    """Per-level statistics of one group of rows, given their row-aligned embeddings."""
    query, positive = emb.query, emb.positive
    positive_score = (query * positive).sum(dim=1)
    levels: dict[str, Any] = {}
    pairs_level: list[int] = []
    pairs_query: list[float] = []
    pairs_positive: list[float] = []
    for level, col in zip(LEVELS, NEG_COLUMNS):
        present = frame[col].is_not_null().to_torch()
        if not bool(present.any()):
            continue
        negative = emb.negatives[col][present]
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


def audit_report(
    frame: pl.DataFrame, emb: RowEmbeddings, *, corpus: Corpus, model: str, sampled: bool
) -> dict[str, Any]:
    """The audit of ``frame`` (the corpus or a sample of it): overall and per source."""
    sources = frame["source"].to_list()
    return {
        "corpus": corpus.name,
        "path": str(corpus.path.resolve()) if corpus.path else None,
        "samples_sha256": corpus.sha256,
        "model": model,
        "sampled_rows": frame.height if sampled else None,
        **level_similarities(frame, emb),
        "by_source": {
            str(name): level_similarities(
                frame.filter(pl.col("source") == name),
                emb.select(torch.tensor([s == name for s in sources])),
            )
            for name in dict.fromkeys(sources)
        },
    }


def sample_rows(frame: pl.DataFrame, max_rows: int | None, seed: int) -> pl.DataFrame:
    """A seeded sample of ``max_rows`` rows in corpus order (the whole frame when smaller)."""
    if max_rows is not None and frame.height > max_rows:
        return frame.sample(max_rows, seed=seed).sort("id")
    return frame


def write_report(report: dict[str, Any], directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``audit.json`` and ``audit.md`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_file, md_file = directory / AUDIT_JSON, directory / AUDIT_MD
    json_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_file.write_text(render_markdown(report), encoding="utf-8")
    outputs.record(directory, AUDIT_JSON, AUDIT_MD)  # a corpus folder stays its command's
    return json_file, md_file


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
    frame = sample_rows(corpus.frame, max_rows, seed)
    texts = list(
        dict.fromkeys(
            t for col in ("query", "positive", *NEG_COLUMNS) for t in frame[col].drop_nulls()
        )
    )
    encoder = load_encoder(model)
    emb = encode(encoder, texts, batch_size=batch_size, description="embedding", progress=progress)
    index = {t: i for i, t in enumerate(texts)}
    report = audit_report(
        frame,
        text_embeddings(frame, emb, index),
        corpus=corpus,
        model=model,
        sampled=frame.height < len(corpus),
    )
    report["seconds"] = round(time.perf_counter() - started, 2)
    write_report(report, directory)
    return report


def _fmt(spread: dict[str, float]) -> str:
    return f"{spread['mean']:.3f} ± {spread['std']:.3f}"


def _level_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = [
        ["positive", str(report["rows"]), _fmt(report["positive_to_query"]), "1.000 ± 0.000", ""]
    ]
    for level, s in report["levels"].items():
        rows.append(
            [
                f"level {level}",
                # rows with a negative at this level, "k of n" when some lack one
                str(s["count"])
                if s["count"] == report["rows"]
                else f"{s['count']} of {report['rows']}",
                _fmt(s["query"]),
                _fmt(s["positive"]),
                f"{100 * s['above_positive']:.1f}%",
            ]
        )
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
        f"Model `{report['model']}`"
        + (f" ({report['pooling']} pooling)" if report.get("pooling") else "")
        + f", {report['rows']} rows"
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
        means = [
            f"{s['levels'][str(lv)]['query']['mean']:.3f}" if str(lv) in s["levels"] else "-"
            for lv in LEVELS
        ]
        lines.append(
            f"| {name} | {s['rows']} | "
            + " | ".join(means)
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
