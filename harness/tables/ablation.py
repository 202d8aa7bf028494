"""The ablation table as numbers: variants x metrics, mean and std over seeds, differences to a
baseline row and a paired bootstrap interval for each difference.

Rows are the combinations of the row axes (``tables.rows``, default every grid axis but the seed);
the other axes (usually only the seed) are replicates, and a row's statistics are over its runs.
Each row is compared with the baseline on the main metric (``eval/avg``, else the held-out
recall@1): the difference of the means, and a paired cluster bootstrap: a row is compared with the
baseline trained with the same seed, on the same task, and the seeds are resampled, each with all
of its tasks (the tasks of one seed share that seed's model, so they are not independent draws;
resampling (seed, task) pairs would make the interval too narrow).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.config import AXIS_ALIASES, ConfigError
from harness.tables.collect import CellRuns, Collected, TrialRun

# mteb task types as categories: the paper's table order (harness/evaluation/scores.py CATEGORIES,
# not imported because that module loads mteb), then mteb's other text task types.
CATEGORY_ORDER = (
    "Retrieval", "Reranking", "Clustering", "PairClassification", "Classification", "STS", "Summarization",
    "BitextMining", "MultilabelClassification", "Regression", "InstructionRetrieval", "InstructionReranking",
)  # fmt: skip
AVG = "eval/avg"
HELDOUT = "heldout/recall_at_1"
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
SHORT_AXIS = {dotted: short for short, dotted in AXIS_ALIASES.items()}


@dataclass(frozen=True)
class Column:
    metric: str  # the MLflow metric
    title: str


@dataclass(frozen=True)
class PairedTest:
    """Paired cluster-bootstrap interval of ``mean(row - baseline)``: replicates resampled, tasks kept
    together within a replicate."""

    diff: float
    low: float
    high: float
    pairs: int
    replicates: int
    tasks: int
    p_value: float = 1.0  # exact sign-flip test over the replicates' mean differences (two-sided)

    @property
    def significant(self) -> bool:
        """The interval excludes 0 and the sign-flip test agrees (p < 1 - CONFIDENCE). With few
        seeds a bootstrap over them is overconfident (with 3, its interval is about the range of
        the 3 differences); the sign-flip test cannot go below 2 / 2^seeds (0.25 with 3 seeds), so
        a † needs at least 6 seeds that agree."""
        return (self.low > 0 or self.high < 0) and self.p_value < 1 - CONFIDENCE


@dataclass
class Row:
    values: tuple[Any, ...]  # one per row axis
    cells: list[CellRuns]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)  # only with two or more values
    count: dict[str, int] = field(default_factory=dict)
    delta: dict[str, float] = field(default_factory=dict)  # mean minus the baseline's mean
    test: PairedTest | None = None

    @property
    def runs(self) -> list[TrialRun]:
        return [c.run for c in self.cells if c.run is not None]

    @property
    def label(self) -> str:
        return " / ".join(str(v) for v in self.values) or "all runs"


@dataclass
class AblationTable:
    experiment: str
    row_axes: list[str]
    replicate_axes: list[str]
    columns: list[Column]
    rows: list[Row]
    baseline: int  # index into rows
    baseline_from_file: bool
    main: Column | None  # the metric of the differences, the test and the bar chart
    collected: Collected
    kind: str = "ablation"  # "ablation" (categories) or "tasks" (one column per task): file stem

    @property
    def missing(self) -> list[CellRuns]:
        return [c for c in self.collected.cells if c.run is None]


def axis_title(axis: str) -> str:
    return SHORT_AXIS.get(axis, axis)


def build_table(collected: Collected, where: str, *, per_task: bool = False) -> AblationTable:
    """Aggregate the collected runs; ``where`` names the file (or experiment) in errors. The
    columns are the category means, the average and the held-out score, or with ``per_task`` every
    task's main score and the average."""
    grid = collected.grid
    row_axes = _row_axes(grid, collected.settings.rows, where)
    replicate_axes = [a for a in grid if a not in row_axes]
    rows = _rows(collected.cells, grid, row_axes)
    runs = [r for row in rows for r in row.runs]
    columns = _task_columns(runs) if per_task else _columns(runs)
    main = next((c for c in columns if c.metric == AVG), None) or next(
        (c for c in columns if c.metric == HELDOUT), columns[0] if columns else None
    )
    baseline = _baseline(rows, row_axes, collected.settings.baseline, where)
    for row in rows:
        for col in columns:
            values = [r.metrics[col.metric] for r in row.runs if col.metric in r.metrics]
            row.count[col.metric] = len(values)
            if values:
                row.mean[col.metric] = statistics.fmean(values)
            if len(values) > 1:
                row.std[col.metric] = statistics.stdev(values)
    base = rows[baseline]
    for i, row in enumerate(rows):
        row.delta = {m: row.mean[m] - base.mean[m] for m in row.mean if m in base.mean}
        if i != baseline and main is not None:
            row.test = paired_test(row, base, main.metric, replicate_axes)
    return AblationTable(
        experiment=collected.experiment,
        row_axes=row_axes,
        replicate_axes=replicate_axes,
        columns=columns,
        rows=rows,
        baseline=baseline,
        baseline_from_file=collected.settings.baseline is not None,
        kind="tasks" if per_task else "ablation",
        main=main,
        collected=collected,
    )


def _row_axes(grid: Mapping[str, list[Any]], rows: Sequence[str] | None, where: str) -> list[str]:
    if rows is None:
        return [a for a in grid if a != AXIS_ALIASES["seed"]]
    axes = [AXIS_ALIASES.get(r, r) for r in rows]
    unknown = [r for r, a in zip(rows, axes) if a not in grid]
    if unknown:
        raise ConfigError(
            f"{where}: tables.rows: {unknown} are not grid axes (the grid has {list(grid)})"
        )
    return axes


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _rows(
    cells: Sequence[CellRuns], grid: Mapping[str, list[Any]], row_axes: Sequence[str]
) -> list[Row]:
    """One row per combination of the row axes' values, in the grid's declared order."""
    rows: dict[tuple[str, ...], Row] = {}
    order = {axis: {_key(v): i for i, v in enumerate(grid[axis])} for axis in row_axes}
    for cell in cells:
        values = tuple(cell.cell[a] for a in row_axes)
        key = tuple(_key(v) for v in values)
        rows.setdefault(key, Row(values, [])).cells.append(cell)
    return [
        rows[k] for k in sorted(rows, key=lambda k: tuple(order[a][v] for a, v in zip(row_axes, k)))
    ]


def _columns(runs: Sequence[TrialRun]) -> list[Column]:
    """Categories present (in the paper's order), the average, the held-out metric."""
    seen = {m for r in runs for m in r.metrics}
    columns = [Column(f"eval/{c}", c) for c in CATEGORY_ORDER if f"eval/{c}" in seen]
    if AVG in seen:
        columns.append(Column(AVG, "Avg"))
    if HELDOUT in seen:
        columns.append(Column(HELDOUT, "Held-out R@1"))
    return columns


def _task_columns(runs: Sequence[TrialRun]) -> list[Column]:
    """Every task's main score (sorted by name), then the average."""
    tasks = sorted({m for r in runs for m in task_scores(r)})
    columns = [Column(m, m.removeprefix("eval/")) for m in tasks]
    if any(AVG in r.metrics for r in runs):
        columns.append(Column(AVG, "Avg"))
    return columns


def task_scores(run: TrialRun) -> dict[str, float]:
    """``eval/<Task>`` main scores of a run: every ``eval/*`` that is neither a category nor the average."""
    categories = {f"eval/{c}" for c in CATEGORY_ORDER}
    return {
        m: v
        for m, v in run.metrics.items()
        if m.startswith("eval/") and m != AVG and m not in categories
    }


def _baseline(
    rows: Sequence[Row], row_axes: Sequence[str], wanted: Mapping[str, Any] | None, where: str
) -> int:
    if not wanted:
        return 0
    named = {AXIS_ALIASES.get(k, k): v for k, v in wanted.items()}
    unknown = [k for k in named if k not in row_axes]
    if unknown:
        raise ConfigError(
            f"{where}: tables.baseline: {unknown} are not row axes of the table "
            f"(rows vary {[axis_title(a) for a in row_axes]})"
        )
    hits = [
        i
        for i, row in enumerate(rows)
        if all(_key(row.values[row_axes.index(a)]) == _key(v) for a, v in named.items())
    ]
    if len(hits) != 1:
        labels = [row.label for row in rows]
        raise ConfigError(
            f"{where}: tables.baseline {dict(wanted)} matches {len(hits)} of the rows {labels}; "
            f"name one value for each of {[axis_title(a) for a in row_axes]}"
        )
    return hits[0]


def paired_test(
    row: Row, base: Row, metric: str, replicate_axes: Sequence[str]
) -> PairedTest | None:
    """Paired bootstrap against the baseline; ``None`` with fewer than two shared replicates.

    With ``eval/avg`` as the metric, a pair is one task under one replicate (seed), so the
    interval reflects both seed noise and task spread; otherwise one value per replicate.
    """

    def paired(r: Row) -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        for cell in r.cells:
            if cell.run is None:
                continue
            rep = _key([cell.cell[a] for a in replicate_axes])
            scores = task_scores(cell.run) if metric == AVG else {}
            if not scores and metric in cell.run.metrics:
                scores = {metric: cell.run.metrics[metric]}
            out.update({(rep, task): v for task, v in scores.items()})
        return out

    ours, theirs = paired(row), paired(base)
    shared = sorted(set(ours) & set(theirs))
    replicates = {rep for rep, _ in shared}
    if len(replicates) < 2:
        return None
    diffs = np.array([ours[k] - theirs[k] for k in shared])
    clusters = [rep for rep, _ in shared]
    low, high = bootstrap_interval(diffs, clusters)
    per_replicate = [float(diffs[[c == r for c in clusters]].mean()) for r in sorted(replicates)]
    return PairedTest(
        float(diffs.mean()),
        low,
        high,
        len(shared),
        len(replicates),
        len({t for _, t in shared}),
        sign_flip_p(per_replicate),
    )


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided p of the paired sign-flip (permutation) test that the mean difference is 0: the
    share of the 2^n sign assignments whose |mean| is at least the observed one (exact up to 16
    replicates, else 100,000 seeded draws)."""
    values = np.asarray(diffs, dtype=float)
    n = len(values)
    if n == 0:
        return 1.0
    observed = abs(values.mean()) - 1e-12
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng(BOOTSTRAP_SEED).choice([-1, 1], size=(100_000, n))
    return float((np.abs((signs * values).mean(axis=1)) >= observed).mean())


def bootstrap_interval(
    diffs: np.ndarray, clusters: Sequence[str] | None = None
) -> tuple[float, float]:
    """Percentile interval of the mean difference (fixed RNG seed: the same file every run).

    With ``clusters`` (the replicate of each difference) whole clusters are resampled: a resample
    draws replicates with replacement and takes every difference of each drawn one. Without, the
    differences themselves are resampled."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    if clusters is None:
        idx = rng.integers(0, len(diffs), size=(BOOTSTRAP_RESAMPLES, len(diffs)))
        means = diffs[idx].mean(axis=1)
    else:
        names = sorted(set(clusters))
        sums = np.array([diffs[[c == n for c in clusters]].sum() for n in names])
        sizes = np.array([sum(c == n for c in clusters) for n in names], dtype=float)
        draw = rng.integers(0, len(names), size=(BOOTSTRAP_RESAMPLES, len(names)))
        means = sums[draw].sum(axis=1) / sizes[draw].sum(axis=1)  # the mean over the drawn pairs
    tail = (1 - CONFIDENCE) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
