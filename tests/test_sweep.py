"""The sweep on one real local Ray instance (shared by the module) and real SQLite MLflow stores."""

from __future__ import annotations

import inspect
import io
import json
import math
import signal
import socket
import time
import urllib.request

import pytest
import sweep_standins
from faults_util import listen_addresses
from mlflow import MlflowClient
from rich.console import Console
from sweep_util import runs, write_experiment

from harness.cli import ui
from harness.cluster import ClusterError, check_reachable
from harness.config import TrackingSettings
from harness.sweep import run_sweep
from harness.tracking import Tracker, metric_name, redact
from harness.ui import start_ui, stop_ui
from synth.corpus import read_manifest


@pytest.mark.faults
def test_grid_layout_failure_and_resume(ray_instance, tmp_path, tiny_corpus_dir):
    exp = write_experiment(
        tmp_path, tiny_corpus_dir, "grid", grid={"pooling": ["eos", "mean", "ata"]}
    )
    first = io.StringIO()
    summary = run_sweep(
        exp,
        [],
        trial_fn=sweep_standins.quick,
        results_dir=tmp_path / "results",
        console=Console(file=first, width=200),
    )

    # one cell failed, the others finished, and the exit code says so
    assert {r.label: r.status for r in summary.records} == {
        "eos": "FINISHED",
        "mean": "FAILED",
        "ata": "FINISHED",
    }
    assert summary.exit_code == 1 and summary.failed == 1

    client = MlflowClient(summary.tracking_uri)
    (parent,) = runs(tmp_path, "grid", "sweep")
    assert parent.info.status == "FAILED"  # the sweep had a failure
    assert parent.data.params["experiment_file"] == "grid.yaml"
    assert json.loads(parent.data.params["grid"]) == {"model.pooling": ["eos", "mean", "ata"]}
    assert "experiment.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    children = {r.info.run_name: r for r in runs(tmp_path, "grid", "trial")}
    assert set(children) == {"eos", "mean", "ata"}
    for run in children.values():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["corpus_sha256"] == read_manifest(tiny_corpus_dir)["samples_sha256"]
        assert run.data.tags["git_sha"]
        assert json.loads(run.data.tags["harness.cell"]) == {"model.pooling": run.info.run_name}
        assert run.data.params["model.pooling"] == run.info.run_name
        assert run.data.params["train.steps"] == "3"
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
        assert "system/memory_rss_gb" in run.data.metrics

    failed = children["mean"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["harness.error"] == "RuntimeError: mean pooling refused on purpose"

    done = children["ata"]
    assert done.info.status == "FINISHED"
    assert done.data.metrics["heldout/recall_at_1"] == 0.5  # MLflow refuses '@' in names
    assert done.data.metrics["trial/seconds"] >= 0
    assert done.data.tags["harness.level_order"] == "4,3,2,1"
    assert done.data.tags["harness.node_id"]
    artifacts = {a.path for a in client.list_artifacts(done.info.run_id)}
    assert {"config.yaml", "model"} <= artifacts
    assert [a.path for a in client.list_artifacts(done.info.run_id, "model")] == [
        "model/adapter_config.json"
    ]
    # every trial run says where its model is, and so does the summary
    assert done.data.tags["harness.model_uri"] == f"runs:/{done.info.run_id}/model"
    assert done.data.tags["harness.model_path"].endswith("/model")
    assert f"model ata: runs:/{done.info.run_id}/model (" in first.getvalue()

    # a rerun skips what finished and retries what failed; its summary fits 80 columns (cells fold,
    # never end in "…") and says what to run next
    out = io.StringIO()
    again = run_sweep(
        exp,
        [],
        trial_fn=sweep_standins.quick,
        results_dir=tmp_path / "results",
        console=Console(file=out, width=80),
    )
    *printed, last = out.getvalue().splitlines()
    assert "…" not in out.getvalue() and max(map(len, printed)) <= 80, out.getvalue()
    assert last == f"next: harness tables {exp}"  # one copyable line
    assert {r.label: r.status for r in again.records} == {
        "eos": "SKIPPED",
        "ata": "SKIPPED",
        "mean": "FAILED",
    }
    assert len(runs(tmp_path, "grid", "sweep")) == 2
    assert len(runs(tmp_path, "grid", "trial")) == 4


def test_search_runs_optuna_samples_and_resumes(ray_instance, tmp_path, tiny_corpus_dir):
    search = {
        "params": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "metric": "eval/avg",
        "num_samples": 3,
        "max_concurrent": 2,
    }
    exp = write_experiment(tmp_path, tiny_corpus_dir, "search", search=search)
    summary = run_sweep(exp, [], trial_fn=sweep_standins.quick, results_dir=tmp_path / "results")
    assert summary.exit_code == 0 and summary.count("FINISHED") == 3

    children = runs(tmp_path, "search", "trial")
    lrs = sorted(float(r.data.params["train.lr"]) for r in children)
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert all(r.info.status == "FINISHED" and "eval/avg" in r.data.metrics for r in children)

    # the same search again: its budget is spent, nothing runs
    again = run_sweep(exp, [], trial_fn=sweep_standins.quick, results_dir=tmp_path / "results")
    assert again.parent_run_id is None and len(runs(tmp_path, "search", "trial")) == 3


def test_real_trial_trains_and_reports(
    ray_instance, tmp_path, tiny_corpus_dir, smollm2_dir, shared_data
):
    """Real trials: LoRA training of the packaged SmolLM2 for two steps, held-out score and a
    10-pair STS evaluation, two seeds; the untrained model of their shared arm is scored once (the
    second trial reads the first one's cache) and logged at step 0 by both."""
    pytest.importorskip("harness.train")
    from test_eval_run import sts_subset

    task = sts_subset(shared_data, tmp_path, "BIOSSES", 10)
    exp = write_experiment(
        tmp_path,
        tiny_corpus_dir,
        "real",
        model={
            "name": "packaged:smollm2-135m-instruct",
            "lora": {"r": 4},
            "max_query_length": 16,
            "max_doc_length": 16,
        },
        train={
            "steps": 2,
            "batch_size": 2,
            "warmup_steps": 0,
            "heldout_size": 4,
            "heldout_before": True,
        },
        eval={"tasks": [str(task)], "batch_size": 8},
        grid={"seed": [1, 2]},
        resources={"cpus_per_trial": 2},  # one trial at a time: the second finds the cache
    )
    summary = run_sweep(exp, [], results_dir=tmp_path / "results")
    assert summary.exit_code == 0, [r.error for r in summary.records]
    trials = runs(tmp_path, "real", "trial")
    assert len(trials) == 2
    client = MlflowClient(summary.tracking_uri)
    for run in trials:
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
        assert any(k.startswith("heldout/") for k in run.data.metrics)
        assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
        (before,) = client.get_metric_history(run.info.run_id, "eval_base/BIOSSES")
        assert before.step == 0 and math.isfinite(before.value)
        assert {"heldout_base/recall_at_1", "eval_base/avg"} <= set(run.data.metrics)
    untrained = [r.data.metrics["eval_base/avg"] for r in trials]
    assert untrained[0] == untrained[1]
    cache = tmp_path / "results" / "models" / "_untrained"
    assert len(list(cache.glob("*.json"))) == 1  # one arm
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # evaluated once


@pytest.mark.faults
def test_unreachable_cluster_fails_fast():
    start = time.monotonic()
    with pytest.raises(ClusterError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:9"):
        check_reachable("127.0.0.1:9", timeout=2)
    assert time.monotonic() - start < 5


@pytest.mark.faults
def test_names_and_secrets():
    assert metric_name("heldout/recall@1") == "heldout/recall_at_1"
    assert metric_name("eval/STS Benchmark") == "eval/STS Benchmark"
    clean = redact({"synth.api_key": "abc", "x.note": "key sk-abcdefghijklmnop12", "a": 1})
    assert clean == {"synth.api_key": "***", "x.note": "key ***", "a": 1}


@pytest.mark.faults
@pytest.mark.parametrize(
    "uri",
    [
        "http://alice:s3cretpw@127.0.0.1:9",
        "http://127.0.0.1:9/?token=s3cretpw",
        "https://alice:s3cretpw@127.0.0.1:9/mlflow?x=1",
    ],
)
def test_credentials_in_a_tracking_uri_are_never_shown(uri, tally):
    from harness.tracking import TrackingError, redact_text

    with pytest.raises(TrackingError) as caught:
        Tracker(TrackingSettings(uri=uri), "creds", "exp.yaml")
    assert "s3cretpw" not in str(caught.value) and "127.0.0.1:9" in str(caught.value)
    assert "s3cretpw" not in redact({"tracking.uri": uri})["tracking.uri"]
    assert "s3cretpw" not in redact_text(f"tracking:\n  uri: {uri}\n")
    tally(cases=1, searched=3)


@pytest.mark.faults
def test_ui_serves_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(TrackingSettings(uri=uri), "ui-check")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_ui(uri, port)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-check"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert json.load(r)["experiment"]["name"] == "ui-check"
        # `harness ui` serves on loopback unless told otherwise (--host)
        assert listen_addresses(proc.pid) == {"127.0.0.1"}
        assert inspect.signature(ui).parameters["host"].default == "127.0.0.1"
    finally:
        stop_ui(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_harness_ui_stops_its_server_on_sigterm_and_refuses_a_missing_store(tmp_path):
    """`kill` of `harness ui` left the MLflow server (and its workers) serving the port; a
    missing SQLite file was silently created as an empty store."""
    import subprocess
    import sys

    missing = subprocess.run(
        [
            sys.executable,
            "-c",
            "from harness.cli import main; main()",
            "ui",
            f"sqlite:///{tmp_path / 'nope.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no MLflow store at" in missing.stderr
    assert not (tmp_path / "nope.db").exists()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(TrackingSettings(uri=uri), "ui-stop")
    port = _free_port()
    cli = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from harness.cli import main; main()",
            "ui",
            uri,
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in cli.stdout:
            if line.startswith("MLflow UI for"):
                break
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the port is free once every server process is gone
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"something still serves port {port} after `harness ui` was stopped")
    leftover = subprocess.run(
        ["pgrep", "-f", f"backend-store-uri {uri}"], capture_output=True, text=True
    )
    assert leftover.stdout.strip() == "", "MLflow server processes outlived `harness ui`"


@pytest.mark.faults
def test_a_trial_with_non_finite_scores_fails_and_reruns(
    ray_instance, tmp_path, tiny_corpus_dir, tally
):
    exp = write_experiment(tmp_path, tiny_corpus_dir, "nan", grid={"pooling": ["eos", "mean"]})
    summary = run_sweep(
        exp, [], trial_fn=sweep_standins.nan_score, results_dir=tmp_path / "results"
    )
    assert {r.label: r.status for r in summary.records} == {"eos": "FAILED", "mean": "FINISHED"}
    failed = {r.info.run_name: r for r in runs(tmp_path, "nan", "trial")}["eos"]
    assert "not finite: eval/avg" in failed.data.tags["harness.error"]
    again = run_sweep(exp, [], trial_fn=sweep_standins.nan_score, results_dir=tmp_path / "results")
    assert {r.label: r.status for r in again.records} == {"eos": "FAILED", "mean": "SKIPPED"}, (
        "resume must rerun it"
    )
    tally(cases=2, faults=2, trials=4)


def test_a_moved_sqlite_store_keeps_its_artifacts_beside_it(tmp_path):
    """A committed store resumed from another checkout: MLflow keeps the absolute artifact folder
    the experiment was created with; the Tracker points it beside the moved store, so new runs'
    models neither leave the checkout nor fail where the old path does not exist."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.txt").write_text("w", encoding="utf-8")

    def log_one(folder) -> str:
        tracker = Tracker(TrackingSettings(uri=f"sqlite:///{folder / 'mlflow.db'}"), "moved")
        run_id = tracker.start_trial(None, name="t", params={}, tags={}, role="trial")
        tracker.log_artifacts(run_id, tmp_path / "model", "model")
        tracker.finish_trial(run_id)
        return run_id

    first = log_one(tmp_path / "a")
    assert (tmp_path / "a" / "artifacts").is_dir()
    (tmp_path / "a").rename(tmp_path / "b")
    second = log_one(tmp_path / "b")
    assert not (tmp_path / "a").exists(), "the old checkout's folder was recreated"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}")
    uri = client.get_run(second).info.artifact_uri
    assert uri.startswith((tmp_path / "b" / "artifacts").as_uri()), uri
    assert list((tmp_path / "b" / "artifacts").rglob("weights.txt"))
    assert client.get_run(first).info.status == "FINISHED"  # runs logged before keep their record
    # a store that did not move, or a location the file chose, is left alone
    custom = tmp_path / "custom"
    Tracker(
        TrackingSettings(uri=f"sqlite:///{tmp_path / 'c.db'}", artifact_location=custom.as_uri()),
        "kept",
    )
    assert (
        MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'c.db'}")
        .get_experiment_by_name("kept")
        .artifact_location
        == custom.as_uri()
    )


def test_a_trial_that_failed_after_training_is_evaluated_not_trained_again(
    ray_instance, tmp_path, tiny_corpus_dir, shared_data
):
    """A real trial whose evaluation fails (a score in the task file is not a number, which only
    reading it shows) keeps its finished training; after the file is fixed, the rerun evaluates
    that model (same weights, the whole loss curve replayed into the new run) instead of training
    again. At paper scale that is hours of GPU time per mistake."""
    task = tmp_path / "tasks" / "BIOSSES"
    task.mkdir(parents=True)
    lines = (shared_data / "BIOSSES" / "test.tsv").read_text(encoding="utf-8").splitlines()[:21]
    good = "\n".join(lines) + "\n"
    head, first, *rest = lines
    cells = first.split("\t")
    cells[2] = "n/a"
    (task / "test.tsv").write_text(
        "\n".join([head, "\t".join(cells), *rest]) + "\n", encoding="utf-8"
    )
    exp = write_experiment(
        tmp_path,
        tiny_corpus_dir,
        "reuse",
        model={
            "name": "packaged:all-minilm-l6-v2",
            "pooling": "mean",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "max_query_length": 32,
            "max_doc_length": 32,
        },
        train={"steps": 3, "batch_size": 4, "heldout_size": 8, "warmup_steps": 0, "device": "cpu"},
        # no untrained scoring: it would read the broken task file before training (and fail
        # there, cheaply); this test is about a failure after training
        eval={"tasks": [str(task)], "batch_size": 16, "untrained": False},
    )
    first_try = run_sweep(exp, [], results_dir=tmp_path / "results")
    assert [r.status for r in first_try.records] == ["FAILED"]
    assert "score column is not a number" in (first_try.records[0].error or "")
    (adapter,) = (tmp_path / "results" / "models").rglob("adapter_model.safetensors")
    trained_at = adapter.stat().st_mtime_ns

    (task / "test.tsv").write_text(good, encoding="utf-8")
    out = io.StringIO()
    second = run_sweep(
        exp, [], results_dir=tmp_path / "results", console=Console(file=out, width=200)
    )
    assert [r.status for r in second.records] == ["FINISHED"], second.records
    # the trial's evaluation progress reaches the driver's console, a line per task
    assert "base: evaluated [1/1] BIOSSES (cosine_spearman " in out.getvalue(), out.getvalue()
    assert adapter.stat().st_mtime_ns == trained_at, "the model was trained again"
    finished = next(r for r in runs(tmp_path, "reuse", "trial") if r.info.status == "FINISHED")
    assert finished.data.tags["harness.reused_training"].endswith("trained.json")
    assert "eval/avg" in finished.data.metrics and "heldout/recall_at_1" in finished.data.metrics
    history = MlflowClient(second.tracking_uri).get_metric_history(
        finished.info.run_id, "train/loss"
    )
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_git_sha_is_dirty_for_code_not_for_results(tmp_path):
    """`make smoke` rewrites the committed results/smoke files; later runs were tagged +dirty."""
    import subprocess

    from harness.tracking import git_sha

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("1\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    sha = git_sha(tmp_path)
    assert len(sha) == 40
    (tmp_path / "results" / "table.md").write_text("2\n")
    assert git_sha(tmp_path) == sha
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_sha(tmp_path) == sha + "+dirty"


@pytest.mark.faults
def test_a_sweep_that_ray_tune_stops_keeps_its_finished_trials_and_says_so(
    ray_instance, tmp_path, tiny_corpus_dir, monkeypatch, tally
):
    """The memory monitor killed a Tune worker mid-sweep: `tuner.fit` raised "Caught unexpected
    exception", the driver died with a traceback, no summary, and runs stayed RUNNING. A real OOM
    kill cannot be produced on demand, so the driver's callback raises that error here while one
    trial runs (fake); what the driver does with it is real."""
    from harness.driver import TrackingCallback

    original = TrackingCallback.on_trial_result

    def dies_mid_sweep(self, iteration, trials, trial, result, **info):
        original(self, iteration, trials, trial, result, **info)
        if result.get("harness/step") == 2:
            raise RuntimeError(
                "Caught unexpected exception: 1 worker(s) were killed due to the node running low on memory.\nmore"
            )

    monkeypatch.setattr(TrackingCallback, "on_trial_result", dies_mid_sweep)
    exp = write_experiment(
        tmp_path,
        tiny_corpus_dir,
        "stopped",
        grid={"pooling": ["eos", "ata"]},
        resources={"cpus_per_trial": 1, "max_concurrent_trials": 1},
    )
    out = io.StringIO()
    summary = run_sweep(
        exp,
        [],
        trial_fn=sweep_standins.slow_ata,
        results_dir=tmp_path / "r",
        console=Console(file=out, width=200),
    )
    assert summary.exit_code == 1 and summary.stopped and "running low on memory" in summary.stopped
    assert {r.label: r.status for r in summary.records} == {"eos": "FINISHED", "ata": "FAILED"}
    printed = out.getvalue()
    assert (
        "the sweep stopped early" in printed and "run the same command again to resume" in printed
    )
    assert "Traceback" not in printed
    statuses = {r.info.run_name: r.info.status for r in runs(tmp_path, "stopped", "trial")}
    assert statuses == {"eos": "FINISHED", "ata": "FAILED"}  # nothing left RUNNING
    (parent,) = runs(tmp_path, "stopped", "sweep")
    assert parent.info.status == "FAILED"
    monkeypatch.setattr(TrackingCallback, "on_trial_result", original)
    again = run_sweep(exp, [], trial_fn=sweep_standins.quick, results_dir=tmp_path / "r")
    assert {r.label: r.status for r in again.records} == {"eos": "SKIPPED", "ata": "FINISHED"}
    tally(cases=2, faults=1, trials=4)
