"""The optional ``search:`` block: Optuna (through Ray Tune's OptunaSearch) over named ranges.

Each sampled trial is a flat mapping of dotted fields (``{"train.lr": 3e-4, ...}``), the same shape
as a grid cell, so a searched trial is tracked, named and keyed exactly like a grid trial. Grid axes
given alongside a search become categorical dimensions of the search. Resuming a search feeds the
trials that already finished to Optuna as evaluated points and spends only the remaining budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from harness.config import Experiment, SearchParam, SearchSettings
from harness.tracking import FinishedTrial


def _domain(param: SearchParam) -> Any:
    if param.type == "choice":
        return tune.choice(list(param.values or []))
    low, high = float(param.low or 0), float(param.high or 0)
    if param.type == "loguniform":
        return tune.loguniform(low, high)
    if param.type == "int":
        return tune.randint(int(low), int(high) + 1)  # both ends included, as a reader expects
    return tune.uniform(low, high)


def search_space(exp: Experiment) -> dict[str, Any]:
    """Tune domains by dotted field: the search ranges plus the grid axes as choices."""
    assert exp.search is not None
    space = {field: tune.choice(list(values)) for field, values in exp.grid.items()}
    space.update({field: _domain(p) for field, p in exp.search.params.items()})
    return space


class _FinalResultOptuna(OptunaSearch):
    """Optuna sees only final results: streamed training steps do not carry the target metric."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def make_searcher(
    exp: Experiment, done: Sequence[FinishedTrial], max_concurrent: int | None = None
) -> Searcher:
    """OptunaSearch in a ConcurrencyLimiter (``search.max_concurrent``, or ``max_concurrent`` when
    lower), warm-started with ``done`` (earlier finished trials)."""
    settings: SearchSettings = exp.search  # type: ignore[assignment]
    space = search_space(exp)
    scored = [t for t in done if settings.metric in t.metrics and set(t.cell) == set(space)]
    optuna = _FinalResultOptuna(
        space=space,
        metric=settings.metric,
        mode=settings.mode,
        seed=settings.seed,
        points_to_evaluate=[t.cell for t in scored] or None,
        evaluated_rewards=[t.metrics[settings.metric] for t in scored] or None,
    )
    limit = min(settings.max_concurrent, max_concurrent or settings.max_concurrent)
    return ConcurrencyLimiter(optuna, max_concurrent=limit)
