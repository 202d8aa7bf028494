"""From mteb results to the paper's numbers: per-task main score, category means, average.

Scores stay on mteb's scale (0-1; the paper's tables print them x100). As in MTEB and the paper,
``avg`` is the mean over tasks, not over categories, so a suite with 15 retrieval tasks weighs
retrieval 15 times. A task's score is its main score on the ``test`` split (MSMARCO: its one split,
``dev``), averaged over the task's evaluated subsets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl
from mteb.results import TaskResult

# mteb task types in the paper's table order; other types keep their mteb name as the category.
CATEGORIES = (
    "Retrieval",
    "Reranking",
    "Clustering",
    "PairClassification",
    "Classification",
    "STS",
    "Summarization",
)
SCHEMA = {
    "task": pl.String,
    "category": pl.String,
    "main_score": pl.String,
    "score": pl.Float64,
    "split": pl.String,
    "seconds": pl.Float64,
    "note": pl.String,
}


@dataclass(frozen=True)
class TaskScore:
    task: str
    category: str
    main_score: str
    score: float
    split: str
    seconds: float
    note: str = ""


def task_score(
    result: TaskResult, category: str, main_score: str, *, seconds: float, note: str = ""
) -> TaskScore:
    """The main score of one mteb result (test split when present)."""
    splits = ["test"] if "test" in result.scores else sorted(result.scores)
    return TaskScore(
        task=result.task_name,
        category=category,
        main_score=main_score,
        score=float(result.get_score(splits=splits)),
        split=",".join(splits),
        seconds=seconds,
        note=note,
    )


def frame(scores: Iterable[TaskScore]) -> pl.DataFrame:
    """One row per task, in the paper's category order, then by task name."""
    df = pl.DataFrame([vars(s) for s in scores], schema=SCHEMA)
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return (
        df.with_columns(
            pl.col("category").replace_strict(order, default=len(order)).alias("_order")
        )
        .sort("_order", "task")
        .drop("_order")
    )


def category_means(df: pl.DataFrame) -> pl.DataFrame:
    """Mean score and task count per category, in the paper's order."""
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return (
        df.group_by("category")
        .agg(pl.col("score").mean().alias("score"), pl.len().alias("tasks"))
        .with_columns(pl.col("category").replace_strict(order, default=len(order)).alias("_order"))
        .sort("_order", "category")
        .drop("_order")
    )


def metrics(df: pl.DataFrame) -> dict[str, float]:
    """MLflow metrics: ``eval/<Task>``, ``eval/<Category>``, ``eval/avg`` (mean over tasks)."""
    if df.is_empty():
        return {}
    out: dict[str, float] = {f"eval/{r['task']}": r["score"] for r in df.iter_rows(named=True)}
    out.update(
        {f"eval/{r['category']}": r["score"] for r in category_means(df).iter_rows(named=True)}
    )
    out["eval/avg"] = float(df["score"].mean())  # type: ignore[arg-type]
    return out


def markdown(df: pl.DataFrame) -> str:
    """A small Markdown table of a frame (scores x100 as in the paper), categories and average."""
    lines = [
        "| task | category | main score | score (x100) | seconds | note |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in df.iter_rows(named=True):
        lines.append(
            f"| {r['task']} | {r['category']} | {r['main_score']} | {100 * r['score']:.2f} | "
            f"{r['seconds']:.0f} | {r['note']} |"
        )
    for r in category_means(df).iter_rows(named=True):
        lines.append(
            f"| **{r['category']}** ({r['tasks']} tasks) | | mean | {100 * r['score']:.2f} | | |"
        )
    if not df.is_empty():
        lines.append(
            f"| **avg** ({df.height} tasks) | | mean | {100 * float(df['score'].mean()):.2f} | "
            f"{df['seconds'].sum():.0f} | |"
        )  # type: ignore[arg-type]
    return "\n".join(lines) + "\n"
