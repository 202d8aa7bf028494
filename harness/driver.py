"""The sweep's driver: the Ray Tune callback that is the only MLflow writer of trial runs, the
console progress lines and the closing summary.

:class:`TrackingCallback` runs on the driver and turns the trials' ``tune.report`` results into the
parent / child run layout of DESIGN.md; :func:`print_plan` and :func:`print_summary` are what the
sweep prints before and after its trials. ``harness/sweep.py`` plans and runs the sweep.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.checkpoints import Stream
from harness.config import Experiment
from harness.mlflow_model import NAME as MLFLOW_MODEL_NAME
from harness.tracking import (
    MLFLOW_MODEL,
    MODEL_DIR,
    MODEL_PATH,
    MODEL_URI,
    RESUMED,
    Tracker,
    describe_error,
    metric_name,
    redact_text,
)
from harness.trial import (
    ARTIFACTS,
    KIND,
    NOTE,
    STEP,
    STREAM,
    TAGS,
    TrialSpec,
    cell_of,
    trial_spec,
    unpack_artifacts,
)

# summary table headers of the usual metrics
SHORT_METRIC = {"train/loss": "loss", "eval/avg": "avg", "heldout/recall_at_1": "R@1"}
PROGRESS_EVERY_S = 15.0  # one progress line per running trial at most this often


@dataclass
class TrialRecord:
    label: str
    key: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED, SKIPPED
    run_id: str | None = None
    seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass
class SweepSummary:
    experiment: str
    tracking_uri: str
    parent_run_id: str | None
    records: list[TrialRecord]
    wall_seconds: float
    concurrency: int
    next_command: str = ""  # what to run next (the tables of this experiment), shown last
    stopped: str | None = None  # why Ray Tune stopped before every trial ended (then exit 1)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def failed(self) -> int:
        return sum(r.status in ("FAILED", "KILLED") for r in self.records)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.stopped else 0

    @property
    def ideal_seconds(self) -> float:
        """Sum of trial times divided by the concurrency: the wall time with zero overhead."""
        ran = [r.seconds for r in self.records if r.seconds is not None and r.status != "SKIPPED"]
        return sum(ran) / max(1, min(self.concurrency, len(ran))) if ran else 0.0


@dataclass
class Plan:
    """What a sweep runs and skips (made by ``harness.sweep.make_plan``, shown by print_plan)."""

    pending: list[TrialSpec]
    skipped: list[TrialSpec]
    search_samples: int  # Optuna samples still to run (0 for a grid)
    warm_start: list[Any]  # finished trials fed to Optuna


# ---------------------------------------------------------------- the driver's MLflow writer


class TrackingCallback(tune.Callback):
    """Turns trial reports into MLflow child runs; runs on the driver (the store's one writer)."""

    def __init__(
        self,
        tracker: Tracker,
        parent_id: str,
        base: Experiment,
        corpus_sha256: str,
        tags: Mapping[str, str],
        console: Console,
    ):
        self.tracker = tracker
        self.parent_id = parent_id
        self.base = base
        self.corpus_sha256 = corpus_sha256
        self.tags = dict(tags)
        self.console = console
        self.records: dict[str, TrialRecord] = {}  # by Tune trial id
        self._specs: dict[str, TrialSpec] = {}
        self._last_step: dict[str, int] = {}
        # trial -> metric -> last step logged: a resumed trial's redone steps are not logged twice
        self._logged: dict[str, dict[str, int]] = {}
        self._last_print: dict[str, float] = {}
        self._first_step: dict[
            str, tuple[float, int]
        ] = {}  # trial -> (time, step) of its first step
        self._started: dict[str, float] = {}
        # trials started by this driver that have reported no step yet: a resume among them comes
        # from a checkpoint an earlier sweep left (its run is continued), not from a retry here
        self._fresh: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its run config, callbacks included, for ``Tuner.restore``; this sweep
        resumes from MLflow instead, so the live client and console stay out of the pickle."""
        return {**self.__dict__, "tracker": None, "console": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.records:  # a retry (resources.max_failures) continues its run
            return
        spec = trial_spec(self.base, cell_of(trial.config), self.corpus_sha256)
        run_id = self.tracker.start_trial_run(
            spec.exp,
            parent_id=self.parent_id,
            name=spec.label,
            key=spec.key,
            cell=spec.cell,
            tags=self.tags,
        )
        self._specs[trial.trial_id] = spec
        self._fresh.add(trial.trial_id)
        self._started[trial.trial_id] = time.time()
        self.records[trial.trial_id] = TrialRecord(spec.label, spec.key, "RUNNING", run_id)
        self.console.print(f"[cyan]start[/] {spec.label} ({spec.key})")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        record = self.records[trial.trial_id]
        kind = result.pop(KIND, None)
        tags = result.pop(TAGS, {})
        bundle = result.pop(ARTIFACTS, None)  # popped before Ray stores or logs the result
        metrics = {
            k: float(v)
            for k, v in result.items()
            if "/" in k
            and not k.startswith("harness/")
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        }
        if kind == "step":
            self._fresh.discard(trial.trial_id)
            step = int(result[STEP])
            new_step = step > self._last_step.get(trial.trial_id, -1)
            self._last_step[trial.trial_id] = max(step, self._last_step.get(trial.trial_id, -1))
            self._log_new(trial.trial_id, record, metrics, step)
            if new_step:  # the held-out score after training comes at the last step again
                self._progress(trial.trial_id, step)
        elif kind == "resume":  # the trial continues from its checkpoint of step STEP
            step, stream = int(result[STEP]), result.pop(STREAM, [])
            if trial.trial_id in self._fresh:  # a checkpoint an earlier sweep left in its folder
                self._fresh.discard(trial.trial_id)
                resumed = self._continue_earlier_run(trial.trial_id, record, step, stream)
            else:  # a retry (resources.max_failures) in this run
                resumed = f"step {step} after step {self._last_step.get(trial.trial_id, 0)}"
            reached = self._last_step.get(trial.trial_id, 0)
            if record.tags.get(RESUMED):
                resumed = f"{record.tags[RESUMED]}; {resumed}"
            record.tags[RESUMED] = resumed
            self.tracker.set_tags(record.run_id, {RESUMED: resumed})
            self.console.print(
                f"  {record.label}: resumed from its checkpoint at step {step} "
                f"({_count(max(0, reached - step), 'step')} to redo)",
                highlight=False,
                markup=False,
            )
        elif kind == "checkpoint":  # kept by Tune; nothing to log
            pass
        elif kind == "note":  # a progress line of the trial (e.g. each evaluated task)
            self.console.print(
                f"  {record.label}: {result.get(NOTE, '')}", highlight=False, markup=False
            )
        elif kind == "final":
            self._log_new(trial.trial_id, record, metrics, self._last_step.get(trial.trial_id, 0))
            logged = self._log_artifacts(record, bundle, tags) if bundle else set()
            # where the trained model is: logged with the run, or left on the trial's node
            location = f"runs:/{record.run_id}/model" if "model" in logged else tags.get(MODEL_DIR)
            if location:
                tags[MODEL_URI] = location
            self.tracker.set_tags(record.run_id, tags)
            record.tags.update(tags)
            record.seconds = metrics.get("trial/seconds")

    def _continue_earlier_run(
        self, trial_id: str, record: TrialRecord, step: int, stream: Stream
    ) -> str:
        """The trial resumed from the checkpoint (of ``step``, holding ``stream``) that an earlier
        sweep left in its folder: continue that sweep's run of the trial, so one run holds the
        whole curve, and drop the run just started. The run is the newest KILLED or FAILED one of
        the trial whose logged metrics agree with the checkpoint's record of them (the same
        attempt logged both); with none (deleted, another store) the new run stays and gets the
        checkpoint's metrics of steps 0 to ``step``. Returns the ``harness.resumed`` text."""
        for earlier in self.tracker.unfinished_trial_runs(record.key):
            history = self.tracker.history(earlier.run_id)
            if _holds(history, stream):
                break
        else:
            for at, metrics in stream:
                self._log_new(trial_id, record, metrics, at)
            self._last_step[trial_id] = step
            return f"step {step} after a run not found (steps 0-{step} copied from the checkpoint)"
        self.tracker.continue_trial_run(earlier.run_id, parent_id=self.parent_id, tags=self.tags)
        self.tracker.discard_run(record.run_id)
        self.console.print(
            f"  {record.label}: continues its {earlier.status} run {earlier.run_id}",
            highlight=False,
            markup=False,
        )
        record.run_id = earlier.run_id
        if earlier.tags.get(RESUMED):
            record.tags[RESUMED] = earlier.tags[RESUMED]
        # what the run holds is not logged again; what the driver had not logged yet when it
        # stopped (the checkpoint is saved before the driver logs its step) is, from the checkpoint
        self._logged[trial_id] = {name: max(steps) for name, steps in history.items() if steps}
        for at, metrics in stream:
            self._log_new(trial_id, record, metrics, at)
        reached = max(self._logged[trial_id].values(), default=0)
        self._last_step[trial_id] = reached
        return f"step {step} after step {reached}"

    def _log_new(
        self, trial_id: str, record: TrialRecord, metrics: dict[str, float], step: int
    ) -> None:
        """Log the metrics not logged yet at ``step``: a trial resumed from a checkpoint redoes
        the steps after it, with the same values, and its curve must stay one value per step."""
        logged = self._logged.setdefault(trial_id, {})  # by the name MLflow holds
        new = {k: v for k, v in metrics.items() if step > logged.get(metric_name(k), -1)}
        if new:
            self.tracker.log_metrics(record.run_id, new, step)
            logged.update(dict.fromkeys(map(metric_name, new), step))
        record.metrics.update(metrics)

    def _log_artifacts(self, record: TrialRecord, bundle: bytes, tags: dict[str, str]) -> set[str]:
        """Log a trial's artifacts, its MLflow model (``tracking.log_model``) as a logged model
        (tagged in ``tags``); return the names logged."""
        logged: set[str] = set()
        with tempfile.TemporaryDirectory(prefix="harness-artifacts-") as tmp:
            for entry in unpack_artifacts(bundle, Path(tmp)):
                if entry.name == MLFLOW_MODEL_NAME and entry.is_dir():
                    try:
                        tags[MLFLOW_MODEL] = self.tracker.log_model(record.run_id, entry)
                    except Exception as e:  # the trial's results stand; say what was not logged
                        self.console.print(
                            f"[yellow]warning[/] {record.label}: its MLflow model was not logged: "
                            f"{escape(describe_error(e))}"
                        )
                        continue
                elif entry.is_dir():
                    self.tracker.log_artifacts(record.run_id, entry, entry.name)
                else:
                    self.tracker.log_artifacts(record.run_id, entry.parent)
                logged.add(entry.name)
        return logged

    def _progress(self, trial_id: str, step: int) -> None:
        now = time.time()
        if step == 0:  # metrics of the untrained model (heldout_before): no loss and no rate yet
            return
        # the rate counts from the first step reported, so model loading and the untrained model's
        # held-out score do not inflate it
        first_time, first_step = self._first_step.setdefault(trial_id, (now, step))
        if now - self._last_print.get(trial_id, 0.0) < PROGRESS_EVERY_S:
            return
        self._last_print[trial_id] = now
        spec, record = self._specs[trial_id], self.records[trial_id]
        total = spec.exp.train.steps
        loss = record.metrics.get("train/loss", math.nan)
        line = f"  {spec.label}: step {step}/{total}, loss {loss:.4f}"
        if step > first_step:
            per_step = (now - first_time) / (step - first_step)
            line += f", {per_step:.2f} s/step, ETA {per_step * max(total - step, 0):.0f} s"
        self.console.print(line)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self.records[trial.trial_id]
        self.tracker.finish_trial(record.run_id)
        record.status = "FINISHED"
        if record.seconds is None:
            record.seconds = time.time() - self._started[trial.trial_id]
        self.console.print(
            f"[green]done[/]  {record.label} in {record.seconds:.0f} s {_key_metrics(record)}"
        )

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failed trial that Tune retries (resources.max_failures): say why, in one line."""
        record = self.records.get(trial.trial_id)
        if record is None:
            return
        error = describe_error(_trial_exception(trial)).splitlines()[0]
        retries = self._specs[trial.trial_id].exp.resources.max_failures
        self.console.print(
            f"  {record.label}: failed ({error}); retry {trial.num_failures} of {retries}",
            highlight=False,
            markup=False,
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self.records.get(trial.trial_id)
        if record is None:  # failed before it started (e.g. the actor could not be created)
            self.on_trial_start(iteration, trials, trial)
            record = self.records[trial.trial_id]
        record.error = describe_error(_trial_exception(trial))
        record.status = "FAILED"
        record.seconds = time.time() - self._started[trial.trial_id]
        self.tracker.fail_trial(record.run_id, record.error)
        self.console.print(f"[red]FAILED[/] {record.label}: {record.error}")

    def abandon(self, reason: str) -> None:
        """Ray Tune itself stopped (not a trial: e.g. the memory monitor killed one of its
        workers): the trials still running fail with that reason, so no run stays RUNNING."""
        for trial_id, record in self.records.items():
            # RUNNING, or KILLED by on_experiment_end, which Tune calls on its way out
            if record.status in ("RUNNING", "KILLED") and record.error is None:
                record.status = "FAILED"
                record.error = f"the sweep stopped: {reason}"
                record.seconds = time.time() - self._started[trial_id]
                self.tracker.fail_trial(record.run_id, record.error)

    def interrupted(self) -> bool:
        """Whether the run was interrupted: only ``on_experiment_end`` marks a run KILLED."""
        return any(r.status == "KILLED" for r in self.records.values())

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Runs still open here were interrupted (Ctrl-C): mark them KILLED, not RUNNING forever."""
        for record in self.records.values():
            if record.status == "RUNNING":
                record.status = "KILLED"
                self.tracker.client.set_terminated(record.run_id, "KILLED")


def _holds(history: Mapping[str, Mapping[int, float]], stream: Stream) -> bool:
    """Whether a run's metrics (:meth:`Tracker.history`) are those of a checkpoint's ``stream``:
    every value both hold agrees, and they share at least one. The values are the same floats
    (one attempt reported both), rates and times included, so another attempt does not match."""
    shared = 0
    for step, metrics in stream:
        for name, value in metrics.items():
            logged = history.get(metric_name(name), {}).get(step)
            if logged is None:
                continue
            if not math.isclose(logged, float(value), rel_tol=1e-9, abs_tol=0.0):
                return False
            shared += 1
    return shared > 0


def _trial_exception(trial: Any) -> BaseException | None:
    """The exception Tune just saved for ``trial`` on this machine (before it syncs to storage)."""
    path = trial.pickled_error_file
    if not path or not Path(path).is_file():
        return None
    from ray import cloudpickle

    with open(path, "rb") as f:
        return cloudpickle.load(f)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _key_metrics(record: TrialRecord) -> str:
    keys = [k for k in ("heldout/recall_at_1", "eval/avg") if k in record.metrics]
    return " ".join(f"{k} {record.metrics[k]:.4f}" for k in keys)


# ---------------------------------------------------------------- console


def print_plan(
    console: Console, exp: Experiment, plan: Plan, per_trial: Mapping[str, float], concurrency: int
) -> None:
    wanted: Any = {k: v for k, v in per_trial.items() if v}
    if exp.resources.workers_per_trial > 1:
        wanted = f"{exp.resources.workers_per_trial} workers x {wanted}"
    n = plan.search_samples if exp.search else len(plan.pending)
    what = f"{n} Optuna samples toward {exp.search.metric}" if exp.search else f"{n} trials"
    console.print(
        f"[bold]plan[/] {exp.name}: {what}, {len(plan.skipped) + len(plan.warm_start)} already finished, "
        f"resources per trial {wanted}, expected concurrency {concurrency}"
    )
    for spec in plan.skipped:
        console.print(f"  skip {spec.label} ({spec.key}): FINISHED in MLflow")
    for spec in plan.pending:
        console.print(f"  run  {spec.label} ({spec.key})")


def print_summary(console: Console, summary: SweepSummary) -> None:
    """The closing table: one row per trial with its status, time and key metrics; errors below."""
    metric_keys = [
        "train/loss",
        *sorted(
            {
                k
                for r in summary.records
                for k in r.metrics
                if k.startswith(("heldout/recall", "eval/avg"))
            }
        ),
    ]
    # Fits 80 columns for the usual grid: light borders, short headers, the key's first 8 hex
    # digits (the full key is the run's tag); cells fold rather than end in "…" when they must.
    table = Table(title=f"sweep {summary.experiment}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column(
        "trial",
        overflow="fold",
        min_width=min(24, max(len(r.label) for r in summary.records) if summary.records else 5),
    )
    for col in (
        "key",
        "status",
        "s",
        *(SHORT_METRIC.get(k, k.split("/")[-1]) for k in metric_keys),
    ):
        table.add_column(col, overflow="fold")
    style = {"FINISHED": "green", "FAILED": "red", "KILLED": "red", "SKIPPED": "dim"}
    for r in summary.records:
        table.add_row(
            r.label,
            r.key[:8],
            f"[{style.get(r.status, 'default')}]{r.status}[/]",
            f"{r.seconds:.0f}" if r.seconds is not None else "",
            *(f"{r.metrics[k]:.4f}" if k in r.metrics else "" for k in metric_keys),
        )
    console.print(table)
    for r in summary.records:
        if r.error:
            console.print(f"[red]{r.label}[/]: {r.error}")
    for r in summary.records:  # where each trained model is (harness export / eval take either)
        if r.status == "FINISHED" and r.tags.get(MODEL_URI):
            where = r.tags[MODEL_URI]
            local = r.tags.get(MODEL_PATH)
            extra = f" ({local})" if local and local != where else ""
            console.print(
                f"model {r.label}: {where}{extra}", highlight=False, markup=False, soft_wrap=True
            )
    timing = (
        f" (sum of trial times / concurrency {summary.concurrency}: {summary.ideal_seconds:.0f} s)"
        if summary.concurrency
        else ""
    )
    console.print(
        f"{summary.count('FINISHED')} finished, {summary.failed} failed, {summary.count('SKIPPED')} skipped "
        f"in {summary.wall_seconds:.0f} s{timing}; MLflow: {redact_text(summary.tracking_uri)}"
        + (f", parent run {summary.parent_run_id}" if summary.parent_run_id else ""),
        highlight=False,
    )
    if summary.next_command:
        # soft_wrap: the command stays on one line, copyable, however narrow the terminal
        console.print(
            f"next: {summary.next_command}", highlight=False, markup=False, soft_wrap=True
        )
