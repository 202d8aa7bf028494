"""Negative schedules: which difficulty level of hard negative each training example uses, and when.

A schedule turns (corpus rows, strategy, steps, batch size, seed) into the exact ordered stream of
training examples; the same inputs always give the same stream.

- ``curriculum``: levels 4, 3, 2, 1 (easy to hard) in four equal phases of the training steps;
- ``reverse``: levels 1, 2, 3, 4 (hard to easy);
- ``random``: a random level per example;
- ``level-K``: level K throughout;
- ``all``: all four negatives for every example.

Level 1 is the hardest negative (closest to the query). A row that lacks the scheduled level (e.g.
retrieval data with one negative in ``neg_1``) uses its nearest available level, so such rows keep
their own negative. With ``negatives_per_query`` k > 1 the k available levels nearest to the
scheduled one are used (ties go to the easier level).

Rows are batched ``mixed`` (a seeded permutation of the whole corpus per epoch) or ``by_task``
(every batch from one task, the rows sharing ``source`` and ``subtask``, as LLM2Vec's E5 data
loader does: each task's rows shuffled, cut into full batches, the batches of all tasks shuffled;
a task's remainder short of a batch waits for the next epoch). The row order depends on the seed
and the batching only, never on the strategy: every strategy with the same seed trains on the same
rows in the same order, and only the level differs (``random`` draws its levels from a separate
stream). With ``schedule_rows="synthetic"`` only the synthetic rows (``source == "synthetic"``)
follow the strategy; the others (a mixed-in retrieval corpus) keep ``other_rows_level`` (default 1,
their mined hard negative) at every step, as the paper's figure applies the level order to "the
synthetic negative samples". Rows of ``symmetric`` tasks carry the instruction on both sides (LLM2Vec/E5: NLI and
duplicate-question data embed query, positive and negatives with the same instruction).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import polars as pl

from harness.config import TrainSettings
from synth.corpus import LEVELS, NEG_COLUMNS, SYNTHETIC_SOURCE

PHASED = {"curriculum": (4, 3, 2, 1), "reverse": (1, 2, 3, 4)}


@dataclass(frozen=True)
class Example:
    instruction: str
    query: str
    positive: str
    negatives: tuple[str, ...]
    levels: tuple[int, ...]  # the level of each negative
    row_id: str
    doc_instruction: str | None = (
        None  # the instruction of the positive and negatives (symmetric rows)
    )


@dataclass(frozen=True)
class Phase:
    start: int  # first step (0-based, inclusive)
    end: int  # last step + 1
    level: int | str  # a level, or "random" / "all"


@dataclass
class Schedule:
    strategy: str
    batches: list[list[Example]]
    phases: list[Phase] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[Example]]:
        return iter(self.batches)

    def level_order(self) -> list[int | str]:
        """The phase levels in the order training used them (logged with every trial)."""
        return [p.level for p in self.phases]

    def step_level(self, step: int) -> int | str:
        for p in self.phases:
            if p.start <= step < p.end:
                return p.level
        raise IndexError(step)

    def used_levels(self) -> list[tuple[int, ...]]:
        """Levels actually drawn per step (after fallbacks), for tests and audits."""
        return [tuple(lv for ex in batch for lv in ex.levels) for batch in self.batches]


def phase_level(strategy: str, step: int, steps: int) -> int | str:
    """The scheduled level at ``step`` (0-based) of ``steps``."""
    if strategy in PHASED:
        return PHASED[strategy][min(3, step * 4 // steps)]
    if strategy.startswith("level-"):
        return int(strategy.split("-", 1)[1])
    if strategy in ("random", "all"):
        return strategy
    raise ValueError(f"unknown strategy {strategy!r}")


def phases(strategy: str, steps: int) -> list[Phase]:
    out: list[Phase] = []
    for step in range(steps):
        level = phase_level(strategy, step, steps)
        if out and out[-1].level == level:
            out[-1] = Phase(out[-1].start, step + 1, level)
        else:
            out.append(Phase(step, step + 1, level))
    return out


def nearest_levels(target: int, available: Sequence[int], k: int) -> tuple[int, ...]:
    """The ``k`` available levels closest to ``target`` (ties: the easier, higher level first)."""
    return tuple(sorted(available, key=lambda lv: (abs(lv - target), -lv))[:k])


def build_schedule(
    frame: pl.DataFrame,
    strategy: str,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    negatives_per_query: int = 1,
    batching: str = "mixed",
    schedule_rows: str = "all",
    other_rows_level: int = 1,
) -> Schedule:
    """The exact training stream (see the module docstring)."""
    if frame.height < batch_size:
        raise ValueError(
            f"the corpus has {frame.height} training rows, fewer than batch_size={batch_size}"
        )
    columns = ["id", "instruction", "query", "positive", *NEG_COLUMNS]
    kinds = frame["task_kind"].to_list() if "task_kind" in frame.columns else [None] * frame.height
    if schedule_rows == "synthetic":  # only the MGH rows follow the strategy
        scheduled = [source == SYNTHETIC_SOURCE for source in frame["source"].to_list()]
    elif schedule_rows == "all":
        scheduled = [True] * frame.height
    else:
        raise ValueError(f"unknown schedule_rows {schedule_rows!r}")
    rows = frame.select(columns).rows()
    plan = phases(strategy, steps)
    k = len(LEVELS) if strategy == "all" else negatives_per_query
    if batching == "by_task":
        order = by_task_batches(task_groups(frame), steps=steps, batch_size=batch_size, seed=seed)
    elif batching == "mixed":
        order = mixed_batches(frame.height, steps=steps, batch_size=batch_size, seed=seed)
    else:
        raise ValueError(f"unknown batching {batching!r}")
    level_rng = random.Random(f"levels-{seed}")  # apart from the row order (see module docstring)

    batches: list[list[Example]] = []
    for step, idx in enumerate(order):
        level = phase_level(strategy, step, steps)
        batch = []
        for i in idx:
            row_id, instruction, query, positive, *negs = rows[i]
            available = [lv for lv, text in zip(LEVELS, negs) if text is not None]
            # drawn for every row, so a row's random level does not depend on schedule_rows
            target = (
                level_rng.randint(1, 4) if level == "random" else (1 if level == "all" else level)
            )
            if not scheduled[i]:  # keeps its own negative, whatever the strategy
                chosen = nearest_levels(other_rows_level, available, negatives_per_query)
            else:
                chosen = nearest_levels(target, available, k) if k else ()
                if level == "all":
                    chosen = tuple(available)
            batch.append(
                Example(
                    instruction=instruction,
                    query=query,
                    positive=positive,
                    negatives=tuple(negs[lv - 1] for lv in chosen),
                    levels=chosen,
                    row_id=row_id,
                    doc_instruction=doc_instruction(instruction, kinds[i]),
                )
            )
        batches.append(batch)
    return Schedule(strategy=strategy, batches=batches, phases=plan)


def doc_instruction(instruction: str | None, task_kind: str | None) -> str | None:
    """The instruction a row's positive and negatives get: the row's own for symmetric tasks, else none."""
    return instruction or None if task_kind == "symmetric" else None


def schedule_for(train: TrainSettings, frame: pl.DataFrame) -> Schedule:
    """The stream ``train`` settings make of ``frame`` (what a trial trains on)."""
    return build_schedule(
        frame,
        train.strategy,
        steps=train.steps,
        batch_size=train.batch_size,
        seed=train.seed,
        negatives_per_query=train.negatives_per_query,
        batching=train.batching,
        schedule_rows=train.schedule_rows,
        other_rows_level=train.other_rows_level,
    )


def mixed_batches(n_rows: int, *, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices per step, epoch by epoch from a seeded permutation (leftovers go first)."""
    rng = random.Random(seed)
    order: list[int] = []
    out: list[list[int]] = []
    for _ in range(steps):
        if len(order) < batch_size:  # new epoch: reshuffle
            perm = list(range(n_rows))
            rng.shuffle(perm)
            leftover = set(order)
            order = order + [i for i in perm if i not in leftover]
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def task_groups(frame: pl.DataFrame) -> list[list[int]]:
    """Row indices per task (rows sharing ``source`` and ``subtask``), tasks sorted by name."""
    keys = list(zip(frame["source"].to_list(), frame["subtask"].to_list()))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [groups[key] for key in sorted(groups)]


def by_task_batches(
    groups: Sequence[Sequence[int]], *, steps: int, batch_size: int, seed: int
) -> list[list[int]]:
    """Row indices per step, each batch from one group (see the module docstring)."""
    if not any(len(g) >= batch_size for g in groups):
        sizes = sorted((len(g) for g in groups), reverse=True)[:5]
        raise ValueError(
            f"train.batching 'by_task': no task has batch_size={batch_size} rows (largest: {sizes}); "
            "lower the batch size or use batching 'mixed'"
        )
    rng = random.Random(seed)
    pending: list[list[int]] = [[] for _ in groups]  # per group, rows not yet used this epoch
    out: list[list[int]] = []
    while len(out) < steps:
        epoch: list[list[int]] = []
        for g, rows in enumerate(groups):
            perm = list(rows)
            rng.shuffle(perm)
            leftover = set(pending[g])
            queue = pending[g] + [i for i in perm if i not in leftover]
            full = len(queue) // batch_size * batch_size
            epoch += [queue[s : s + batch_size] for s in range(0, full, batch_size)]
            pending[g] = queue[full:]
        rng.shuffle(epoch)
        out += epoch
    return out[:steps]


def split_heldout(frame: pl.DataFrame, size: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Deterministic held-out slice, the same for every trial on a corpus: the ``size`` rows with the
    smallest ids (ids are content hashes, so this is a fixed pseudo-random sample)."""
    if size <= 0:
        return frame, frame.clear()
    if size >= frame.height:
        raise ValueError(f"heldout_size={size} leaves no training rows (corpus has {frame.height})")
    ordered = frame.sort("id")
    return ordered.slice(size), ordered.head(size)
