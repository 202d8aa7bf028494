"""MLflow layout of a sweep (DESIGN.md, "Tracking names"), written from the driver only.

One experiment per experiment file (its ``name``), one parent run per ``harness sweep`` invocation
(tag ``harness.role=sweep``) and one child run per trial (tag ``harness.role=trial``, nested by
``mlflow.parentRunId``, named by :func:`harness.experiment_file.cell_label`). A SQLite store tolerates one
writer (mlflow#4123), so trials never touch MLflow: they report through Ray and the driver's
:class:`Tracker` writes. Everything that leaves the process passes :func:`redact` first.

Over 400 lines because it is the only module that talks to MLflow (names, store, writer, reader):
another tracking backend replaces this one file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from harness.config import TrackingSettings, trial_params

if TYPE_CHECKING:
    from harness.config import Experiment

ROLE = "harness.role"
TRIAL_KEY = "trial_key"
CELL = "harness.cell"
SWEEP_KEY = "harness.sweep_key"
ERROR = "harness.error"
DRIVER = "harness.driver"
PARENT = "mlflow.parentRunId"
CORPUS_SHA = "corpus_sha256"
GIT_SHA = "git_sha"
LEVEL_ORDER = "harness.level_order"  # the schedule's levels in order, e.g. "4,3,2,1"
MODEL_DIR = "model_dir"  # where a trained model lies ([host:]path), when it is not an artifact
MODEL_URI = "harness.model_uri"  # where the trained model is: runs:/<run>/model, else [host:]path
MODEL_PATH = "harness.model_path"  # the folder a trial saved its model in (host:path)
MLFLOW_MODEL = "harness.mlflow_model"  # models:/<id>: the model as a registrable MLflow model
# each resume of a trial from its checkpoint (train.checkpoint_every): "step C after step K" (K: the
# last step its run holds from the stopped attempt; K - C steps were trained twice), "; "-joined;
# "step C after a run not found (...)" when a rerun found no run of the trial holding the
# checkpoint's steps (deleted, another store): the checkpoint's own record of steps 0-C is logged
RESUMED = "harness.resumed"
# the Ray node ids of a trial's workers in rank order (resources.workers_per_trial > 1)
WORKER_NODES = "harness.worker_nodes"
# a re-evaluation (`harness eval RUN_ID`) is a child run of the trial it evaluated, role
# "evaluation": the trial's own metrics stay the sweep's, the tables read trials only
EVALUATED_RUN = "harness.evaluated_run"
EVAL_TASKS = "harness.eval_tasks"  # what a re-evaluation scored: its suite, or its tasks
EVAL_ARTIFACT = "mteb"  # mteb's result files of an evaluation

MAX_PARAM_CHARS = 6000  # MLflow's param value limit (8000 in recent versions; stay well under)
MAX_ERROR_CHARS = 1000
_BATCH = 900  # MLflow caps log_batch at 1000 metrics / 100 params
_METRIC_BAD = re.compile(r"[^\w\-. :/]")
_SECRET_KEY = re.compile(
    r"(api[_-]?key|token|secret|password|passwd|authorization|credential)", re.IGNORECASE
)
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_-]{12,}|hf_[A-Za-z0-9]{20,}|Bearer\s+\S+)")
# credentials inside URIs: the userinfo of scheme://user:pass@host, and secret-named query parameters
_URI_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@?#]+@")
_URI_QUERY_SECRET = re.compile(
    r"([?&;][\w.-]*(?:token|key|secret|password|passwd|pwd|sig|signature|auth|credential)[\w.-]*=)[^&;#\s'\"]+",
    re.IGNORECASE,
)


def redact(data: Mapping[str, Any]) -> dict[str, Any]:
    """Hide values under secret-looking keys and secret-looking substrings in any value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if _SECRET_KEY.search(str(key).rsplit(".", 1)[-1]):
            out[key] = "***"
        elif isinstance(value, str):
            out[key] = redact_text(value)
        else:
            out[key] = value
    return out


def metric_name(name: str) -> str:
    """A name MLflow accepts (alphanumerics, ``_ - . : /`` and spaces): ``recall@1`` -> ``recall_at_1``."""
    return _METRIC_BAD.sub("_", name.replace("@", "_at_"))


def redact_text(text: str) -> str:
    """Hide secret-looking substrings in free text such as a config dump or an error: API keys,
    bearer tokens, a URI's ``user:password@`` and secret-named query parameters (``?token=...``)."""
    text = _URI_USERINFO.sub(r"\1***@", text)
    text = _URI_QUERY_SECRET.sub(r"\1***", text)
    return _SECRET_VALUE.sub("***", text)


def resolve_uri(uri: str) -> str:
    """Make a relative ``sqlite:///`` path absolute (against the cwd) and create its folder.

    Ray workers run in their own working directories, so a relative store path would point
    somewhere else in every process that reads it.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = Path(uri[len(prefix) :])
    if not path.is_absolute():
        path = Path.cwd() / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return prefix + str(path)


@contextlib.contextmanager
def read_only(uri: str) -> Iterator[str]:
    """A tracking URI through which ``uri`` can be read without changing it.

    Opening a SQLite store with a newer MLflow migrates its schema in place, so merely reading a
    committed store (``harness tables --no-log``, ``harness plan``) would rewrite it. For a SQLite
    store this yields a private copy (SQLite's online backup: consistent even while a sweep
    writes; the source is opened read-only), deleted afterwards; a tracking server's URI is
    yielded as it is (the server owns its schema). The copy keeps the experiments' artifact
    locations, so logged artifacts are read from where they are.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        yield uri
        return
    source = Path(uri[len(prefix) :])
    with tempfile.TemporaryDirectory(prefix="harness-read-") as tmp:
        copy = Path(tmp) / source.name
        try:
            src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
            try:
                dst = sqlite3.connect(copy)
                try:
                    src.backup(dst)
                    # a page garbled past the header copies silently: check before MLflow reads
                    problem = dst.execute("PRAGMA quick_check").fetchone()[0]
                finally:
                    dst.close()
            finally:
                src.close()
        except sqlite3.DatabaseError as e:  # not a database, truncated, unreadable
            problem = str(e)
        if problem != "ok":
            raise TrackingError(
                f"{source}: not a readable SQLite MLflow store ({problem}); "
                "restore it from a copy or give another tracking URI"
            )
        yield prefix + str(copy)


def default_artifact_location(uri: str) -> str | None:
    """``<store folder>/artifacts`` for a SQLite store (git-ignored under ``results/``)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None  # a tracking server decides
    return (Path(uri[len(prefix) :]).parent / "artifacts").as_uri()


def follow_moved_store(uri: str, experiment_id: str, location: str) -> bool:
    """Point a SQLite store's experiment at the artifact folder beside the store when the store was
    moved (a committed store in another checkout): MLflow keeps the absolute folder it was created
    with, so new runs would write their models outside the checkout, or fail where that path does
    not exist. Only a default location (``<old store folder>/artifacts``) that is gone is moved;
    runs already logged keep theirs. MLflow has no call for this, so the store's own
    ``experiments.artifact_location`` column is updated. Returns whether it moved."""
    default = default_artifact_location(uri)
    if default is None or location == default or not location.startswith("file://"):
        return False
    old = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))
    if old.name != "artifacts" or old.parent.exists():
        return False  # not the default of another store folder, or that folder is still there
    import sqlite3

    with contextlib.closing(sqlite3.connect(uri[len("sqlite:///") :])) as db, db:
        db.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
            (default, int(experiment_id)),
        )
    return True


class TrackingError(RuntimeError):
    """The tracking server cannot be reached; the message names the URI (and the file)."""


def check_reachable(uri: str, where: str | None = None, timeout: float = 5.0) -> None:
    """Fail in seconds when an http(s) tracking URI does not answer: MLflow's client retries a dead
    server for minutes before it gives up. Any HTTP answer to ``/health`` counts as reachable."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    # user:password@ is for the server (MLflow's client sends it as basic auth), not part of the
    # host urllib would look up
    request = urllib.request.Request(
        urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/")
        + "/health"
    )
    if parts.username is not None:
        user, password = (urllib.parse.unquote(p or "") for p in (parts.username, parts.password))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy, an older server): the client will say more
    except (OSError, ValueError) as e:
        reason = redact_text(str(getattr(e, "reason", e)))
        prefix = f"{where}: " if where else ""
        raise TrackingError(
            f"{prefix}tracking.uri {redact_text(uri)}: no MLflow tracking server answers there ({reason}); "
            "start it (`mlflow server --host 127.0.0.1 --port PORT`) or fix tracking.uri"
        ) from None


def describe_error(exc: BaseException | None) -> str:
    """``Type: message`` of the exception a trial raised, unwrapped from Ray's wrappers."""
    if exc is None:
        return "unknown error (the trial process died without an exception; out of memory?)"
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


@dataclass(frozen=True)
class FinishedTrial:
    run_id: str
    trial_key: str
    cell: dict[str, Any]
    metrics: dict[str, float]
    sweep_key: str | None


@dataclass(frozen=True)
class UnfinishedTrial:
    run_id: str
    status: str  # KILLED or FAILED
    tags: dict[str, str]


class Tracker:
    """The driver's MLflow writer for one experiment."""

    def __init__(self, settings: TrackingSettings, experiment_name: str, where: str | None = None):
        self.uri = resolve_uri(settings.uri)
        self.display_uri = redact_text(self.uri)  # what may be printed or logged
        check_reachable(self.uri, where)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_name = experiment_name
        found = self.client.get_experiment_by_name(experiment_name)
        if found is None:
            location = settings.artifact_location or default_artifact_location(self.uri)
            self.experiment_id = self.client.create_experiment(experiment_name, location)
        else:
            self.experiment_id = found.experiment_id
            if settings.artifact_location is None:
                follow_moved_store(self.uri, found.experiment_id, found.artifact_location)

    # ------------------------------------------------------------ parent run

    def start_sweep(
        self, *, params: Mapping[str, Any], tags: Mapping[str, str], config_yaml: str
    ) -> str:
        """Create the parent run, log what the sweep was asked to do, return its id."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={ROLE: "sweep", DRIVER: _driver(), **tags},
        )
        run_id = run.info.run_id
        self._log(run_id, params=params)
        self.client.log_text(run_id, config_yaml, "experiment.yaml")
        return run_id

    def end_sweep(
        self, run_id: str, *, failed: int, metrics: Mapping[str, float], killed: bool = False
    ) -> None:
        self._log(run_id, metrics=metrics)
        self.client.set_terminated(
            run_id, "KILLED" if killed else "FAILED" if failed else "FINISHED"
        )

    # ------------------------------------------------------------ child runs

    def start_trial(
        self,
        parent_id: str | None,
        *,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        role: str = "trial",
    ) -> str:
        """A child run of ``parent_id``; with no parent, a stand-alone run (``harness train``)."""
        nesting = {PARENT: parent_id} if parent_id else {}
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={ROLE: role, **nesting, DRIVER: _driver(), **tags},
        )
        self._log(run.info.run_id, params=params)
        return run.info.run_id

    def start_trial_run(
        self,
        exp: Experiment,
        *,
        parent_id: str | None,
        name: str,
        key: str,
        cell: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        role: str = "trial",
    ) -> str:
        """The run of one trial, for the sweep's driver and `harness train` alike: its parameters,
        ``trial_key`` and cell tags, and its whole configuration (secrets redacted) as config.yaml."""
        run_id = self.start_trial(
            parent_id,
            name=name,
            params=trial_params(exp),
            tags={
                **(tags or {}),
                TRIAL_KEY: key,
                CELL: json.dumps(cell, sort_keys=True, default=str),
            },
            role=role,
        )
        config_yaml = yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False)
        self.log_text(run_id, redact_text(config_yaml), "config.yaml")
        return run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self._log(run_id, metrics=metrics, step=step)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self._log(run_id, tags=tags)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_model(self, run_id: str, folder: Path) -> str:
        """Log an MLflow model folder (``harness/mlflow_model.py``) as the run's model; its URI."""
        from harness.mlflow_model import log_mlflow_model

        return f"models:/{log_mlflow_model(self.client, run_id, folder)}"

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def finish_trial(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")

    def kill_trial(self, run_id: str) -> None:
        """The run was interrupted (Ctrl-C, SIGTERM): KILLED, not RUNNING forever."""
        self.client.set_terminated(run_id, "KILLED")

    def fail_trial(self, run_id: str, error: str) -> None:
        self._log(run_id, tags={ERROR: error[:MAX_ERROR_CHARS]})
        self.client.set_terminated(run_id, "FAILED")

    # ------------------------------------------------------------ lookups

    def _search(self, filter_string: str) -> Iterable[Any]:
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string, max_results=1000, page_token=token
            )
            yield from page
            token = page.token
            if not token:
                return

    def finished_trials(self) -> dict[str, FinishedTrial]:
        """Every trial that FINISHED in this experiment, by ``trial_key`` (the newest wins)."""
        out: dict[str, FinishedTrial] = {}
        runs = self._search(f"tags.`{ROLE}` = 'trial' and attributes.status = 'FINISHED'")
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            key = run.data.tags.get(TRIAL_KEY)
            if key:
                cell = json.loads(run.data.tags.get(CELL, "{}"))
                sweep_key = run.data.tags.get(SWEEP_KEY)
                out[key] = FinishedTrial(
                    run.info.run_id, key, cell, dict(run.data.metrics), sweep_key
                )
        return out

    def unfinished_trial_runs(self, key: str) -> list[UnfinishedTrial]:
        """The runs of trial ``key`` that ended without finishing (KILLED: a driver that was
        stopped or is gone; FAILED), newest first: what a rerun resumed from a checkpoint in the
        trial's folder continues (:meth:`continue_trial_run`)."""
        found = self._search(f"tags.`{ROLE}` = 'trial' and tags.`{TRIAL_KEY}` = '{key}'")
        return [
            UnfinishedTrial(run.info.run_id, run.info.status, dict(run.data.tags))
            for run in sorted(found, key=lambda r: r.info.start_time or 0, reverse=True)
            if run.info.status in ("KILLED", "FAILED")  # (MLflow's filter has no IN for status)
        ]

    def history(self, run_id: str) -> dict[str, dict[int, float]]:
        """Every metric of a run, by step (the last value logged at a step, as MLflow's UI shows)."""
        out: dict[str, dict[int, float]] = {}
        for name in self.client.get_run(run_id).data.metrics:
            points = sorted(self.client.get_metric_history(run_id, name), key=lambda m: m.timestamp)
            out[name] = {m.step: m.value for m in points}
        return out

    def continue_trial_run(
        self, run_id: str, *, parent_id: str | None, tags: Mapping[str, str]
    ) -> None:
        """Make an unfinished trial run this driver's again: RUNNING, a child of ``parent_id``,
        owned by this process (so a kill of this driver is seen, :func:`driver_gone`), with
        ``tags`` and without the error of the attempt that stopped."""
        if ERROR in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, ERROR)
        nesting = {PARENT: parent_id} if parent_id else {}
        self._log(run_id, tags={**nesting, DRIVER: _driver(), **tags})
        self.client.update_run(run_id, RunStatus.to_string(RunStatus.RUNNING))

    def discard_run(self, run_id: str) -> None:
        """Delete a run this driver just made and then did not need (MLflow keeps it as deleted,
        out of every search, until `mlflow gc`)."""
        self.client.delete_run(run_id)

    def close_stale_runs(self) -> list[str]:
        """Mark RUNNING runs whose driver process is gone as KILLED; return their names.

        A driver killed with SIGKILL cannot end its runs. Runs started by a live driver, or by a
        driver on another host (whose liveness we cannot see), are left alone.
        """
        stale: list[str] = []
        for run in self._search("attributes.status = 'RUNNING'"):
            if driver_gone(run.data.tags):
                self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
                stale.append(run.info.run_name or run.info.run_id)
        return stale

    # ------------------------------------------------------------ plumbing

    def _log(
        self,
        run_id: str,
        *,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        step: int = 0,
    ) -> None:
        now = int(time.time() * 1000)
        p = [Param(k, _param_value(v)) for k, v in redact(params or {}).items()]
        m = [
            Metric(metric_name(k), float(v), now, step)
            for k, v in (metrics or {}).items()
            if _is_number(v)
        ]
        t = [RunTag(k, str(v)) for k, v in redact(tags or {}).items()]
        for i in range(0, len(p), 100):
            self.client.log_batch(run_id, params=p[i : i + 100], synchronous=True)
        for i in range(0, len(m), _BATCH):
            self.client.log_batch(run_id, metrics=m[i : i + _BATCH], synchronous=True)
        if t:
            self.client.log_batch(run_id, tags=t, synchronous=True)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 1] + "…"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _driver() -> str:
    """``host:pid`` of this process, so a later sweep can tell a dead driver's runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def driver_gone(tags: Mapping[str, str]) -> bool:
    """Whether a RUNNING run's driver was on this host and its process is gone (SIGKILL, a crash).
    A driver on another host cannot be seen from here: False."""
    name, _, pid = tags.get(DRIVER, "").rpartition(":")
    return name == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie (dead, not yet reaped by its parent) answers
    ``kill(pid, 0)`` like a live process, so on Linux its state is read too."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc/self/stat").exists():  # not Linux: kill() is all we can ask
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # reaped meanwhile
        return False
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] != "Z"  # the field after "(comm)"


# ---------------------------------------------------------------- the MLflow UI


def git_sha(repo: Path | None = None) -> str:
    """The harness checkout's commit (``+dirty`` with uncommitted changes to anything but
    ``results/``, which runs themselves rewrite), or ``unknown``."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(repo),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!results",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def log_evaluation(
    client: Any, run_id: str, metrics: Mapping[str, float], result_dir: Path, *, what: str
) -> str:
    """A re-evaluation of the trial run ``run_id``: a new child run of it (role ``evaluation``)
    with the scores at step 0 and mteb's files under ``mteb``; the trial's own metrics are never
    touched, so a table never mixes two evaluations. Returns the new run's id.

    Args:
        client: an ``MlflowClient`` of the trial's store.
        run_id: the evaluated trial run.
        metrics: ``eval/*`` scores (``harness.evaluation.scores.metrics``).
        result_dir: the folder of mteb's result files.
        what: the suite or the tasks scored, for the run's name and tag.
    """
    import time

    from mlflow.entities import Metric

    trial = client.get_run(run_id)
    child = client.create_run(
        trial.info.experiment_id,
        run_name=f"{trial.info.run_name or run_id[:8]} eval {what}"[:250],
        tags={
            ROLE: "evaluation",
            PARENT: run_id,
            EVALUATED_RUN: run_id,
            EVAL_TASKS: what[:MAX_PARAM_CHARS],
            DRIVER: _driver(),
        },
    ).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(child, metrics=[Metric(metric_name(k), v, now, 0) for k, v in metrics.items()])
    client.log_artifacts(child, str(result_dir), EVAL_ARTIFACT)
    client.set_terminated(child, "FINISHED")
    return child
