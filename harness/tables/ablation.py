"""The ablation table as numbers: variants x metrics, mean and std over seeds, and each row's
paired comparison with a baseline row.

Rows are the combinations of the row axes (``tables.rows``, default every grid axis but the seed);
the other axes (usually only the seed) are replicates, and a row's statistics are over its runs.
Each row is compared with the baseline on the main metric (``eval/avg``, else the held-out
recall@1), paired: a row's run is compared with the baseline's run of the same seed, on the same
task. Two questions are answered (``harness/tables/stats.py`` says how and why): over seeds (a
t-test and t-interval over the per-seed differences, each seed's tasks averaged first, since a
seed's tasks share one model) and over tasks (Wilcoxon over the per-task differences of the
seed-averaged scores), each with Holm's correction across the table's comparisons.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from harness.config import AXIS_ALIASES, ConfigError
from harness.tables import stats
from harness.tables.collect import CellRuns, Collected, TrialRun
from harness.untrained import untrained_metric

# mteb task types as categories: the paper's table order (harness/evaluation/scores.py CATEGORIES,
# not imported because that module loads mteb), then mteb's other text task types.
CATEGORY_ORDER = (
    "Retrieval", "Reranking", "Clustering", "PairClassification", "Classification", "STS", "Summarization",
    "BitextMining", "MultilabelClassification", "Regression", "InstructionRetrieval", "InstructionReranking",
)  # fmt: skip
AVG = "eval/avg"
HELDOUT = "heldout/recall_at_1"
SHORT_AXIS = {dotted: short for short, dotted in AXIS_ALIASES.items()}


@dataclass(frozen=True)
class Column:
    metric: str  # the MLflow metric
    title: str


@dataclass(frozen=True)
class SeedTest:
    """Over seeds: the per-seed paired differences (row minus baseline) and their t-test."""

    seeds: tuple[str, ...]  # the replicates both rows have, as labels
    diffs: tuple[float, ...]  # per seed: the mean over the tasks both runs have of row - baseline
    tasks: int  # tasks per pair (1 for a metric without tasks)
    p_value: float  # two-sided paired t-test
    sign_flip_p: float  # exact two-sided sign-flip test (distribution-free; floor 2 / 2^seeds)
    p_holm: float = 1.0  # Holm-adjusted across the table's comparisons

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def diff(self) -> float:
        return stats.mean(self.diffs)

    @property
    def interval(self) -> tuple[float, float]:
        """The 95 % t-interval of the mean per-seed difference."""
        return stats.t_interval(self.diffs)

    @property
    def effect_size(self) -> float | None:
        """d_z: mean / sd of the per-seed differences."""
        return stats.effect_size(self.diffs)

    @property
    def significant(self) -> bool:
        return self.p_holm < stats.ALPHA


@dataclass(frozen=True)
class TaskTest:
    """Over tasks: per task, the seed-averaged row minus the seed-averaged baseline (the seeds both
    rows have), and the Wilcoxon signed-rank test over tasks."""

    tasks: tuple[str, ...]
    diffs: tuple[float, ...]
    seeds: int
    p_value: float
    p_holm: float = 1.0

    @property
    def diff(self) -> float:
        return stats.mean(self.diffs)

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.diffs)

    @property
    def losses(self) -> int:
        return sum(d < 0 for d in self.diffs)

    @property
    def ties(self) -> int:
        return len(self.diffs) - self.wins - self.losses

    @property
    def significant(self) -> bool:
        return self.p_holm < stats.ALPHA


@dataclass
class Row:
    values: tuple[Any, ...]  # one per row axis
    cells: list[CellRuns]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)  # only with two or more values
    count: dict[str, int] = field(default_factory=dict)
    delta: dict[str, float] = field(default_factory=dict)  # mean minus the baseline's mean
    seed_test: SeedTest | None = None  # None: the baseline itself, or fewer than 2 shared seeds
    task_test: TaskTest | None = None  # None: the main metric has no tasks, or fewer than 2

    @property
    def runs(self) -> list[TrialRun]:
        return [c.run for c in self.cells if c.run is not None]

    @property
    def label(self) -> str:
        return " / ".join(str(v) for v in self.values) or "all runs"


@dataclass(frozen=True)
class UntrainedRow:
    """The untrained model of one arm (the rows sharing their ``model.*`` row-axis values): its
    ``eval_base/*`` and ``heldout_base/*`` scores, under the trained columns' metric names."""

    label: str
    rows: tuple[int, ...]  # the trained rows of this arm (indices into the table's rows)
    mean: dict[str, float]  # trained column metric -> the untrained score (mean over the runs)
    runs: int  # runs that logged it
    spread: float  # the largest max - min over runs of one score (0: every run agrees)


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
    untrained: list[UntrainedRow] = field(default_factory=list)

    @property
    def missing(self) -> list[CellRuns]:
        return [c for c in self.collected.cells if c.run is None]

    def below_untrained(self) -> list[tuple[str, Column, float, float]]:
        """(row, column, trained mean, untrained score) for the main and held-out columns where a
        trained row scores below the untrained model of its own arm."""
        out = []
        wanted = [c for c in self.columns if c == self.main or c.metric == HELDOUT]
        for arm in self.untrained:
            for i in arm.rows:
                row = self.rows[i]
                for col in wanted:
                    if col.metric in row.mean and col.metric in arm.mean:
                        if row.mean[col.metric] < arm.mean[col.metric]:
                            out.append((row.label, col, row.mean[col.metric], arm.mean[col.metric]))
        return out


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
            row.seed_test, row.task_test = paired_tests(row, base, main.metric, replicate_axes)
    _adjust(rows)
    untrained = _untrained_rows(rows, row_axes, columns)
    return AblationTable(
        experiment=collected.experiment,
        untrained=untrained,
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


def _untrained_rows(
    rows: Sequence[Row], row_axes: Sequence[str], columns: Sequence[Column]
) -> list[UntrainedRow]:
    """One untrained row per arm: rows that differ only in non-model axes (seed, strategy, lr)
    share one untrained model; a ``model.*`` row axis (pooling) gives each value its own."""
    model_axes = [i for i, a in enumerate(row_axes) if a.startswith("model.")]
    arms: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        arms.setdefault(_key([row.values[j] for j in model_axes]), []).append(i)
    out = []
    for members in arms.values():
        runs = [r for i in members for r in rows[i].runs]
        mean, spread = {}, 0.0
        for col in columns:
            base = untrained_metric(col.metric)
            values = [r.metrics[base] for r in runs if base in r.metrics]
            if values:
                mean[col.metric] = statistics.fmean(values)
                spread = max(spread, max(values) - min(values))
        if not mean:
            continue
        what = " / ".join(str(rows[members[0]].values[j]) for j in model_axes)
        label = f"untrained ({what})" if what else "untrained"
        logged = sum(any(untrained_metric(c.metric) in r.metrics for c in columns) for r in runs)
        out.append(UntrainedRow(label, tuple(members), mean, logged, spread))
    return out


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


def paired_tests(
    row: Row, base: Row, metric: str, replicate_axes: Sequence[str]
) -> tuple[SeedTest | None, TaskTest | None]:
    """Both questions for one row against the baseline (unadjusted: :func:`_adjust` does Holm).

    A pair is one task under one replicate (seed) with ``eval/avg`` as the metric, else one value
    per replicate. The seed test needs two shared seeds; the task test two tasks.
    """

    def paired(r: Row) -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        for cell in r.cells:
            if cell.run is None:
                continue
            rep = replicate_label(cell.cell, replicate_axes)
            scores = task_scores(cell.run) if metric == AVG else {}
            if not scores and metric in cell.run.metrics:
                scores = {metric: cell.run.metrics[metric]}
            out.update({(rep, task): v for task, v in scores.items()})
        return out

    ours, theirs = paired(row), paired(base)
    shared = sorted(set(ours) & set(theirs))
    order = [replicate_label(c.cell, replicate_axes) for c in row.cells]  # the grid's order
    reps = sorted({rep for rep, _ in shared}, key=order.index)
    tasks = sorted({task for _, task in shared})
    diff = {k: ours[k] - theirs[k] for k in shared}
    seed_test = task_test = None
    if len(reps) >= 2:
        per_seed = tuple(stats.mean([d for (r, _), d in diff.items() if r == rep]) for rep in reps)
        seed_test = SeedTest(
            tuple(reps),
            per_seed,
            len(tasks),
            stats.paired_t_p(per_seed),
            stats.sign_flip_p(per_seed),
        )
    if metric == AVG and len(tasks) >= 2:
        # the seeds both rows have for every task: each task's mean is over the same seeds
        both = [rep for rep in reps if all((rep, t) in diff for t in tasks)]
        if both:
            per_task = tuple(stats.mean([diff[(rep, t)] for rep in both]) for t in tasks)
            task_test = TaskTest(tuple(tasks), per_task, len(both), stats.wilcoxon_p(per_task))
    return seed_test, task_test


def _adjust(rows: Sequence[Row]) -> None:
    """Holm across the table's comparisons, one family per question."""
    for attr in ("seed_test", "task_test"):
        tested = [row for row in rows if getattr(row, attr) is not None]
        adjusted = stats.holm([getattr(row, attr).p_value for row in tested])
        for row, p in zip(tested, adjusted):
            setattr(row, attr, replace(getattr(row, attr), p_holm=p))


def replicate_label(cell: Mapping[str, Any], replicate_axes: Sequence[str]) -> str:
    """A replicate's name: ``1`` for seed 1, ``k=v, ...`` for several replicate axes."""
    if len(replicate_axes) == 1:
        return str(cell[replicate_axes[0]])
    return ", ".join(f"{axis_title(a)}={cell[a]}" for a in replicate_axes)
