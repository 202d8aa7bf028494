"""Read one experiment's trials back from MLflow (the only input of ``harness tables``).

The layout is the sweep's (``harness/tracking.py``): one parent run per ``harness sweep``
invocation (tag ``harness.role=sweep``), one child run per trial (``harness.role=trial``) carrying
its grid cell as JSON (``harness.cell``), its ``trial_key`` and its metrics. A grid cell may have
several runs: reruns of the same trial (same ``trial_key``) across sweeps, and runs of older
configurations after the file changed (another ``trial_key``). For each cell the table uses the
newest FINISHED run, preferring runs whose ``trial_key`` matches the experiment file as it is
now; everything else about the cell (how many runs were passed over, why a cell has none) is kept
so that the table's footnotes can say it.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.config import (
    AXIS_ALIASES,
    ConfigError,
    Experiment,
    TablesSettings,
    TrackingSettings,
    trial_key,
)
from harness.experiment_file import apply_cell, cell_label, validate
from harness.tracking import (
    CELL,
    CORPUS_SHA,
    ERROR,
    ROLE,
    TRIAL_KEY,
    driver_gone,
    read_only,
    redact_text,
)

LOSS = "train/loss"


class TablesError(RuntimeError):
    """Nothing to tabulate: no such experiment or store, or no trial runs in it."""


@dataclass(frozen=True)
class TrialRun:
    """One child run, reduced to what the tables need."""

    run_id: str
    name: str
    status: str  # FINISHED, FAILED, KILLED, RUNNING, SCHEDULED
    start_time: int
    trial_key: str
    corpus_sha256: str | None
    cell: dict[str, Any]
    metrics: dict[str, float]
    error: str | None
    params: dict[str, str] = field(default_factory=dict)  # every resolved config field, dotted
    end_time: int = 0  # 0 while running (ms since the epoch, as MLflow keeps it)

    def in_cell(self, cell: Mapping[str, Any]) -> bool:
        """Whether this run trained ``cell``: by the cell it was launched as, or, for an axis that
        run's grid did not have (a grid grown by more seeds or one more strategy), by the value
        its resolved config logged."""
        return all(self._value(axis) == _param_text(value) for axis, value in cell.items())

    def _value(self, axis: str) -> str | None:
        if axis in self.cell:
            return _param_text(self.cell[axis])
        return self.params.get(axis)


def _param_text(value: Any) -> str:
    """A value as MLflow holds it as a param (harness/tracking.py: text as is, the rest as JSON)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


@dataclass(frozen=True)
class CellRuns:
    """A grid cell, the run that represents it (``None``: no FINISHED run) and what was passed over."""

    cell: dict[str, Any]
    label: str
    run: TrialRun | None
    latest: TrialRun | None  # the newest run of any status; explains a cell without a result
    superseded: int  # FINISHED runs of this cell not used (older reruns, other configurations)
    matches_file: bool | None  # the run's trial_key is the current config's (None: no config known)


@dataclass(frozen=True)
class Collected:
    experiment: str
    tracking_uri: str  # as the user gave it (shown in the footnotes)
    resolved_uri: str  # what the client talks to
    grid: dict[str, list[Any]]  # dotted axis -> values, in the declared order
    settings: TablesSettings
    cells: list[CellRuns]
    parent_run_id: str | None  # the newest sweep (parent) run: plots are logged there
    losses: dict[str, list[tuple[int, float]]]  # run_id -> (step, train/loss), for used runs
    grid_source: str  # where the grid order came from (the file, the parent run, the runs)
    extra_runs: int  # FINISHED trial runs whose cell is not in the grid
    description: str = ""  # the experiment file's `description`: the tables' caption
    keys_unknown: str | None = None  # why the current configuration's trial keys are unknown


def cell_json(cell: Mapping[str, Any]) -> str:
    """The canonical form the sweep writes to the ``harness.cell`` tag (matching is by this)."""
    return json.dumps(dict(cell), sort_keys=True, default=str)


def collect(
    exp: Experiment | None, experiment_name: str | None, tracking_uri: str | None
) -> Collected:
    """Everything ``write_tables`` needs from MLflow, with the grid in its declared order."""
    from mlflow import MlflowClient

    name = exp.name if exp is not None else experiment_name
    if not name:
        raise ValueError("write_tables needs an experiment file or an experiment name")
    # without a file, the default store of experiment files (sqlite:///results/mlflow.db)
    uri = tracking_uri or (exp.tracking if exp is not None else TrackingSettings()).uri
    where = exp.source if exp is not None and not tracking_uri else None  # the file gave the URI
    given, uri = uri, _readable_uri(uri, where)
    with read_only(uri) as reading:  # tables never change the store they read
        return _collect(MlflowClient(tracking_uri=reading), exp, name, given, uri)


def _collect(client: Any, exp: Experiment | None, name: str, given: str, uri: str) -> Collected:
    found = client.get_experiment_by_name(name)
    if found is None:
        raise TablesError(
            f"no MLflow experiment named {name!r} in {redact_text(uri)} (run `harness sweep` first)"
        )
    ids = [found.experiment_id]
    trials = [_trial_run(r) for r in _search(client, ids, f"tags.`{ROLE}` = 'trial'")]
    if not trials:
        raise TablesError(f"MLflow experiment {name!r} in {redact_text(uri)} has no trial runs")
    parents = sorted(_search(client, ids, f"tags.`{ROLE}` = 'sweep'"), key=_newest_first)
    parent = parents[0] if parents else None

    # The experiment's configuration: the file, else the one the newest sweep logged. It gives the
    # grid order, the tables settings and the trial_keys of the current configuration.
    reference = (
        exp
        if exp is not None
        else (_logged_experiment(client, parent) if parent is not None else None)
    )
    settings = reference.tables if reference is not None else TablesSettings()
    if reference is not None and reference.grid:
        grid = dict(reference.grid)
        source = "the experiment file" if exp is not None else "the newest sweep's experiment.yaml"
    elif parent is not None and parent.data.params.get("grid", "{}") not in ("{}", "null"):
        grid, source = _grid_param(parent.data.params["grid"]), "the newest sweep's grid parameter"
    else:
        grid, source = _grid_from_runs(trials), "the runs' cells (sorted)"

    unchecked = _keys_unknown(exp)
    cells = [_pick(cell, trials, None if unchecked else reference) for cell in _cells(grid)]
    extra = sum(
        t.status == "FINISHED" and not any(t.in_cell(c.cell) for c in cells) for t in trials
    )
    losses = {
        c.run.run_id: _history(client, c.run.run_id, LOSS) for c in cells if c.run is not None
    }
    return Collected(
        experiment=name,
        tracking_uri=given,
        resolved_uri=uri,
        grid=grid,
        settings=settings,
        cells=cells,
        parent_run_id=parent.info.run_id if parent is not None else None,
        losses=losses,
        grid_source=source,
        extra_runs=extra,
        description=exp.description if exp is not None else "",
        keys_unknown=unchecked,
    )


def _keys_unknown(exp: Experiment | None) -> str | None:
    """Why the trial keys of the file's current configuration cannot be computed here (None: they
    can). A local init adapter is part of the key by its hash or recipe, read from its folder: on
    a machine without the folder (a clone of a committed store) the key is unknown, which says
    nothing about the runs."""
    from harness.init_adapter import local_folder

    folder = local_folder(exp) if exp is not None else None
    if folder is not None and not folder.exists():
        assert exp is not None
        return (
            f"model.init_adapter {exp.model.init_adapter} is not on this machine (its hash is "
            "part of the trial key)"
        )
    return None


def _readable_uri(uri: str, where: str | None) -> str:
    """An absolute sqlite URI for a store that exists (MLflow would create an empty one), or a
    server URI that answers."""
    from harness.tracking import check_reachable, resolve_uri

    check_reachable(uri, where)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not (Path.cwd() / uri[len(prefix) :]).is_file():
        raise TablesError(
            f"no MLflow store at {redact_text(uri)} (run `harness sweep` first, or pass --tracking-uri)"
        )
    return resolve_uri(uri)


def _search(client: Any, experiment_ids: list[str], filter_string: str) -> Iterator[Any]:
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _newest_first(run: Any) -> tuple[int, str]:
    return (-(run.info.start_time or 0), run.info.run_id)


def _trial_run(run: Any) -> TrialRun:
    tags = run.data.tags
    try:
        cell = json.loads(tags.get(CELL, "{}"))
    except json.JSONDecodeError:
        raise TablesError(
            f"run {run.info.run_id}: tag {CELL} is not JSON: {tags[CELL]!r}"
        ) from None
    return TrialRun(
        run_id=run.info.run_id,
        name=run.info.run_name or cell_label(cell),
        # a run left RUNNING by a driver that died (SIGKILL) is shown as what it is, before the
        # next sweep marks it KILLED in the store
        status="KILLED" if run.info.status == "RUNNING" and driver_gone(tags) else run.info.status,
        start_time=run.info.start_time or 0,
        trial_key=tags.get(TRIAL_KEY, ""),
        corpus_sha256=tags.get(CORPUS_SHA),
        cell=cell,
        metrics=dict(run.data.metrics),
        error=tags.get(ERROR),
        params=dict(run.data.params),
        end_time=run.info.end_time or 0,
    )


def _logged_experiment(client: Any, parent: Any) -> Experiment | None:
    """The experiment file the newest sweep logged (its grid order and ``tables`` settings)."""
    with tempfile.TemporaryDirectory(prefix="harness-tables-") as tmp:
        try:
            path = client.download_artifacts(parent.info.run_id, "experiment.yaml", tmp)
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except Exception:
            return None
    try:
        return validate(data, f"experiment.yaml of run {parent.info.run_id}")
    except ConfigError:
        return None


def _grid_param(text: str) -> dict[str, list[Any]]:
    grid = json.loads(text)
    return {AXIS_ALIASES.get(k, k): list(v) for k, v in grid.items()}


def _grid_from_runs(trials: Sequence[TrialRun]) -> dict[str, list[Any]]:
    """Axes and values seen in the runs' cells, sorted (no declared order is available)."""
    values: dict[str, dict[str, Any]] = {}
    for t in trials:
        for axis, value in t.cell.items():
            values.setdefault(axis, {})[json.dumps(value, sort_keys=True, default=str)] = value
    return {
        axis: sorted(
            seen.values(),
            key=lambda v: (type(v).__name__, v if isinstance(v, (int, float, str)) else str(v)),
        )
        for axis, seen in sorted(values.items())
    }


def _cells(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, first axis slowest (as :func:`harness.experiment_file.grid_cells`)."""
    axes = list(grid)
    return [dict(zip(axes, combo)) for combo in itertools.product(*(grid[a] for a in axes))]


def _pick(cell: dict[str, Any], trials: Sequence[TrialRun], exp: Experiment | None) -> CellRuns:
    """The newest FINISHED run of ``cell``, preferring those trained with ``exp``'s configuration."""
    runs = sorted((t for t in trials if t.in_cell(cell)), key=lambda t: (t.start_time, t.run_id))
    finished = [t for t in runs if t.status == "FINISHED"]
    matches: bool | None = None
    if finished and exp is not None:
        configured = apply_cell(exp, cell)
        current = [
            t for t in finished if t.trial_key == trial_key(configured, t.corpus_sha256 or "")
        ]
        matches = bool(current)
        finished = current or finished
    chosen = finished[-1] if finished else None
    passed_over = sum(t.status == "FINISHED" for t in runs) - (chosen is not None)
    return CellRuns(
        cell, cell_label(cell), chosen, runs[-1] if runs else None, passed_over, matches
    )


def _history(client: Any, run_id: str, metric: str) -> list[tuple[int, float]]:
    """A metric's values by step (the last value logged at a step wins, as in MLflow's UI)."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, metric):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(step, by_step[step][1]) for step in sorted(by_step)]
