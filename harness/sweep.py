"""``harness sweep``: the grid (or an Optuna search) of one experiment file as Ray Tune trials.

The driver loads and hash-checks the corpus once and hands it to every trial through Ray's object
store; it plans the trials, skips those that already FINISHED in MLflow (same ``trial_key``), starts
or joins Ray, and is the only process that writes to MLflow: trials report through ``tune.report``
and ``harness/driver.py``'s Tune callback turns reports into the parent / child run layout of
DESIGN.md. Killing the driver loses nothing finished: a rerun skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from rich.console import Console
from rich.markup import escape

from harness.cluster import cluster_capacity, ray_session
from harness.config import Experiment, path_part
from harness.corpora import check_corpus_fits, load_corpus
from harness.driver import (
    Plan,
    SweepSummary,
    TrackingCallback,
    TrialRecord,
    print_plan,
    print_summary,
)
from harness.experiment_file import (
    apply_cell,
    cell_label,
    grid_cells,
    load_experiment,
    validated_cells,
)
from harness.init_adapter import AdapterFiles, check_init_adapter, prepare_init_adapter
from harness.mntp import mntp_builder
from harness.tracking import (
    CORPUS_SHA,
    GIT_SHA,
    MAX_ERROR_CHARS,
    SWEEP_KEY,
    Tracker,
    describe_error,
    git_sha,
    redact_text,
    resolve_uri,
)
from harness.trial import TrialFn, cell_of, run_trial, trial_spec
from synth.corpus import Corpus
from synth.locks import exclusive
from synth.processes import sigterm_as_ctrl_c

log = logging.getLogger(__name__)
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM); the running trials were stopped and marked KILLED"


class SweepError(RuntimeError):
    """The sweep cannot start (no cluster, no room for one trial, no corpus)."""


# ---------------------------------------------------------------- corpus


def store_lock(uri: str, name: str) -> Path:
    """The lock file of one experiment in one tracking store: next to a SQLite store, else in the
    temp folder (a lock is per machine: see synth/locks.py)."""
    key = hashlib.sha256(f"{uri}\0{name}".encode()).hexdigest()[:16]
    base = (
        Path(uri[len("sqlite:///") :]).parent
        if uri.startswith("sqlite:///")
        else Path(tempfile.gettempdir())
    )
    return base / ".harness-locks" / f"{path_part(name)}-{key}.lock"


# ---------------------------------------------------------------- plan


def make_plan(exp: Experiment, corpus_sha256: str, tracker: Tracker, *, resume: bool) -> Plan:
    finished = tracker.finished_trials() if resume else {}
    if exp.search is not None:
        done = [t for t in finished.values() if t.sweep_key == sweep_key(exp, corpus_sha256)]
        return Plan([], [], max(0, exp.search.num_samples - len(done)), done)
    specs = [trial_spec(exp, cell, corpus_sha256) for cell in grid_cells(exp)]
    pending = [s for s in specs if s.key not in finished]
    return Plan(pending, [s for s in specs if s.key in finished], 0, [])


def sweep_key(exp: Experiment, corpus_sha256: str) -> str:
    """Identity of a whole sweep (grid + search + base config + corpus), to find its earlier trials."""
    data = exp.model_dump(mode="json", exclude={"tracking", "resources", "tables", "description"})
    blob = json.dumps({"sweep": data, "corpus": corpus_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- the sweep


def run_sweep(
    exp_path: Path,
    overrides: Sequence[str] = (),
    *,
    address: str | None = None,
    resume: bool = True,
    trial_fn: TrialFn | None = None,
    results_dir: Path | None = None,
    console: Console | None = None,
) -> SweepSummary:
    """Run (or resume) the sweep of one experiment file; see the module docstring.

    ``resume=False`` reruns every trial even when it already finished. ``trial_fn`` replaces the
    real train-and-evaluate step (tests use it for fast, deterministic trials). Ray results go to
    ``<results_dir>/ray/<name>`` and trained models to ``<results_dir>/models/<name>``, on the node
    that trained them (default ``results/`` in the current directory).
    """
    console = console or Console()
    t0 = time.time()
    exp = load_experiment(exp_path, overrides)
    exp.source = str(Path(exp_path).resolve())  # trials run in other working directories
    tables_command = shlex.join(
        ["harness", "tables", str(exp_path), *(a for o in overrides for a in ("--set", o))]
    )
    if exp.search is None:
        validated_cells(exp)  # before the corpus is built: a typo in the grid costs nothing
    check_init_adapter(exp)
    if trial_fn is None and exp.eval.enabled:  # the real trial evaluates: its tasks must resolve
        from harness.evaluation.suites import check_eval

        check_eval(exp.eval, where=exp.source)
    results_dir = (results_dir or Path("results")).resolve()
    uri = resolve_uri(exp.tracking.uri)
    # one driver per experiment and store: taken before the corpus or the MNTP adapter is built
    with exclusive(
        store_lock(uri, exp.name), f"a sweep of experiment {exp.name!r} on {redact_text(uri)}"
    ):
        corpus = load_corpus(exp, console)
        init_adapter = prepare_init_adapter(
            exp, build=mntp_builder(corpus, console), say=console.print
        )
        for cell in [{}] if exp.search else grid_cells(exp):
            check_corpus_fits(apply_cell(exp, cell), corpus)
        tracker = Tracker(exp.tracking, exp.name, exp.source)
        for name in tracker.close_stale_runs():
            console.print(f"[yellow]marked KILLED[/] {name}: left RUNNING by a driver that is gone")
        plan = make_plan(exp, corpus.sha256, tracker, resume=resume)
        skipped = [TrialRecord(s.label, s.key, "SKIPPED") for s in plan.skipped]

        # the workers' library logs (Tune's checkpoint lines, Ray Train's cleaner), set before
        # the trial function runs
        quiet = {"worker_process_setup_hook": "harness.logs.quiet_ray_worker"}
        with ray_session(address, quiet):
            per_trial = exp.resources.per_worker()
            workers = exp.resources.workers_per_trial
            capacity = cluster_capacity(per_trial, workers)
            if capacity < 1:
                what = f"{workers} workers of {per_trial}" if workers > 1 else str(per_trial)
                raise SweepError(
                    f"the Ray cluster has no room for one trial ({what}); "
                    "lower resources.* in the experiment file or add nodes"
                )
            n = plan.search_samples if exp.search else len(plan.pending)
            limits = [n, capacity]
            if exp.resources.max_concurrent_trials:
                limits.append(exp.resources.max_concurrent_trials)
            if exp.search:
                limits.append(exp.search.max_concurrent)
            concurrency = max(1, min(limits))
            print_plan(console, exp, plan, per_trial, concurrency if n else 0)
            if n == 0:
                console.print(
                    "nothing to run: every trial already FINISHED (use --no-resume to rerun)"
                )
                summary = SweepSummary(
                    exp.name, tracker.uri, None, skipped, time.time() - t0, 0, tables_command
                )
                print_summary(console, summary)
                return summary

            parent_id = tracker.start_sweep(
                params={
                    "experiment_file": Path(exp_path).name,
                    "grid": json.dumps(exp.grid, default=str),
                    "search": json.dumps(
                        exp.search.model_dump(mode="json") if exp.search else None
                    ),
                    CORPUS_SHA: corpus.sha256,
                    "trials": n,
                    "skipped": len(plan.skipped) + len(plan.warm_start),
                    "concurrency": concurrency,
                },
                tags={"harness.experiment_file": str(exp_path), GIT_SHA: git_sha()},
                config_yaml=redact_text(
                    yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False)
                ),
            )
            callback = TrackingCallback(
                tracker,
                parent_id,
                exp,
                corpus.sha256,
                {
                    CORPUS_SHA: corpus.sha256,
                    GIT_SHA: git_sha(),
                    SWEEP_KEY: sweep_key(exp, corpus.sha256),
                },
                console,
            )
            stopped = None
            try:
                with sigterm_as_ctrl_c():
                    _fit(
                        exp,
                        plan,
                        corpus,
                        trial_fn,
                        callback,
                        results_dir,
                        per_trial,
                        init_adapter,
                        reuse_training=resume,
                        concurrency=concurrency,
                    )
                if callback.interrupted():  # Tune's Ctrl-C handler ended the run
                    stopped = INTERRUPTED
            except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune's handler was set
                callback.on_experiment_end([])
                stopped = INTERRUPTED
            except Exception as e:  # Tune itself failed: keep what finished, say so, exit 1
                stopped = _stop_reason(e)
                callback.abandon(stopped)
            if stopped:
                console.print(
                    f"[red]the sweep stopped early[/]: {escape(stopped)}; run the same command "
                    "again to resume (finished trials are kept)",
                    highlight=False,
                )
            records = skipped + list(callback.records.values())
            summary = SweepSummary(
                exp.name,
                tracker.uri,
                parent_id,
                records,
                time.time() - t0,
                concurrency,
                tables_command,
                stopped,
            )
            tracker.end_sweep(
                parent_id,
                failed=summary.failed or bool(stopped),
                killed=stopped == INTERRUPTED,
                metrics={
                    "sweep/wall_seconds": summary.wall_seconds,
                    "sweep/ideal_seconds": summary.ideal_seconds,
                    "sweep/finished": summary.count("FINISHED"),
                    "sweep/failed": summary.failed,
                },
            )
        print_summary(console, summary)
        return summary


def _fit(
    exp: Experiment,
    plan: Plan,
    corpus: Corpus,
    trial_fn: TrialFn | None,
    callback: TrackingCallback,
    results_dir: Path,
    per_trial: Mapping[str, float],
    init_adapter: AdapterFiles | None = None,
    *,
    reuse_training: bool = True,
    concurrency: int | None = None,
) -> None:
    from ray.tune.logger import JsonLoggerCallback

    trainable = tune.with_parameters(
        run_trial,
        base=exp,
        corpus=corpus,
        models_dir=str(results_dir / "models"),
        trial_fn=trial_fn,
        init_adapter=init_adapter,
        reuse_training=reuse_training,
    )
    resources = {"cpu": per_trial["CPU"], "gpu": per_trial.get("GPU", 0.0), **exp.resources.custom}
    limit = exp.resources.max_concurrent_trials
    if exp.resources.workers_per_trial > 1:
        # The trial only starts its workers (trial_parallel.py), whose placement group Tune does
        # not see: the trial holds a token (Tune needs some resource; one byte of memory takes no
        # CPU or GPU from the workers), and the concurrency counted for workers is the limit.
        resources, limit = {"cpu": 0, "memory": 1}, concurrency
    if exp.search:
        from harness.search import make_searcher

        param_space: dict[str, Any] = {}
        sampling = {
            "search_alg": make_searcher(exp, plan.warm_start, max_concurrent=limit),
            "num_samples": plan.search_samples,
        }
        # Streamed training steps carry no search metric; Optuna reads the final result only.
        env = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    else:
        param_space = {"cell": tune.grid_search([s.cell for s in plan.pending])}
        sampling, env = {"num_samples": 1, "max_concurrent_trials": limit}, {}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            reuse_actors=exp.resources.reuse_workers,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
            **sampling,
        ),
        run_config=tune.RunConfig(
            name=path_part(exp.name),
            storage_path=storage_path(exp, results_dir),
            callbacks=[callback, JsonLoggerCallback()],
            failure_config=tune.FailureConfig(max_failures=exp.resources.max_failures),
            # train.checkpoint_every: Tune keeps the last K of each trial's checkpoints
            checkpoint_config=tune.CheckpointConfig(num_to_keep=exp.train.keep_checkpoints),
            verbose=0,
        ),
    )
    # Our callback prints progress; Ray's own result tables would bury it.
    with _environ(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1", RAY_AIR_NEW_OUTPUT="0", **env):
        tuner.fit()


def storage_path(exp: Experiment, results_dir: Path) -> str:
    """Where Tune keeps trial state and checkpoints: ``resources.storage_path`` (a URI as given, a
    folder relative to the working directory) or ``<results>/ray``."""
    where = exp.resources.storage_path
    if where is None:
        return str(Path(results_dir, "ray").resolve())
    return where if "://" in where else str(Path(where).expanduser().resolve())


def _stop_reason(e: BaseException) -> str:
    """One line saying why Tune stopped: the first exception of the chain whose message is not a
    formatted traceback (Tune wraps errors in TuneErrors whose message is one)."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        lines = str(current).strip().splitlines()
        if lines and not lines[0].startswith("Traceback"):
            text = f"{type(current).__name__}: {lines[0]}"
            return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return describe_error(e).splitlines()[0]


def _trial_name(trial: Any) -> str:
    return f"{path_part(cell_label(cell_of(trial.config)))}_{trial.trial_id}"
