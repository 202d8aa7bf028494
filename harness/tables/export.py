"""The long format: one row per run x metric, for analyses the ablation table does not do.

Only the runs the table uses are exported (the newest FINISHED run of each grid cell), with their
grid coordinates as columns, so ``long.parquet`` and the table always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from harness.tables.ablation import AVG, CATEGORY_ORDER, axis_title
from harness.tables.collect import Collected

_CATEGORIES = {f"eval/{c}" for c in CATEGORY_ORDER}


def metric_kind(metric: str) -> str | None:
    """``task``, ``category``, ``average`` or ``heldout``; ``None`` for metrics not exported."""
    if metric == AVG:
        return "average"
    if metric in _CATEGORIES:
        return "category"
    if metric.startswith("eval/"):
        return "task"
    if metric.startswith("heldout/"):
        return "heldout"
    return None


def long_frame(collected: Collected) -> pl.DataFrame:
    axes = list(collected.grid)
    records: list[dict[str, Any]] = []
    for cell in collected.cells:
        run = cell.run
        if run is None:
            continue
        for metric in sorted(run.metrics):
            kind = metric_kind(metric)
            if kind is None:
                continue
            records.append(
                {
                    "experiment": collected.experiment,
                    "run_id": run.run_id,
                    "run_name": run.name,
                    "trial_key": run.trial_key,
                    **{axis: cell.cell.get(axis) for axis in axes},
                    "metric": metric,
                    "kind": kind,
                    "name": metric.split("/", 1)[1],
                    "value": float(run.metrics[metric]),
                }
            )
    columns = [
        "experiment",
        "run_id",
        "run_name",
        "trial_key",
        *axes,
        "metric",
        "kind",
        "name",
        "value",
    ]
    data = {c: [r[c] for r in records] for c in columns}
    for axis in axes:
        data[axis] = _uniform(data[axis])
    frame = pl.DataFrame(data, schema_overrides={"value": pl.Float64}, strict=False)
    return frame.rename({axis: axis_title(axis) for axis in axes})


def _uniform(values: Sequence[Any]) -> list[Any]:
    """Keep an axis's values typed when they share one scalar type, else make them strings."""
    types = {type(v) for v in values}
    if len(types) <= 1 and types <= {int, float, str, bool}:
        return list(values)
    return [None if v is None else str(v) for v in values]
