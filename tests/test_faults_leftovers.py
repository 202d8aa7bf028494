"""Signals and leftovers (issue 31, class 7): `harness export RUN_ID` downloaded the run's model
into a `harness-eval-*` folder of the temp dir and never removed it (~29 MB a call), the exported
folder was mode 0700 whatever the umask, and a `harness mntp` stopped with SIGTERM left its MLflow
run RUNNING. The real CLI, real MLflow stores and runs, a real signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient
from test_faults_tracebacks import saved_model  # noqa: F401 (a fixture)
from test_mntp import _exp as mntp_experiment

from harness.config import TrackingSettings
from harness.tracking import Tracker

pytestmark = pytest.mark.faults
HARNESS = [sys.executable, "-c", "from harness.cli import app; app()"]


def test_export_of_a_run_leaves_no_download_and_follows_the_umask(
    saved_model: Path,  # noqa: F811
    tmp_path: Path,
    tally: Any,
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(TrackingSettings(uri=uri), "leftovers")
    client = MlflowClient(uri)
    run_id = client.create_run(tracker.experiment_id).info.run_id
    client.log_artifacts(run_id, str(saved_model), "model")
    client.set_terminated(run_id)
    temp = tmp_path / "temp"
    temp.mkdir()
    out = tmp_path / "exported"
    done = subprocess.run(
        [*HARNESS, "export", run_id, "--out", str(out), "--tracking-uri", uri],
        env={**os.environ, "TMPDIR": str(temp)},
        preexec_fn=lambda: os.umask(0o022),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "modules.json").is_file()
    left = sorted(p.name for p in temp.iterdir() if p.name.startswith("harness-"))
    mode = oct(out.stat().st_mode & 0o777)
    # nothing left in the temp dir, and the mode a plain mkdir under umask 022 gives
    assert (left, mode) == ([], oct(0o755)), f"left in the temp dir: {left}; mode {mode}"
    tally(cases=1, searched=1)


def test_sigterm_to_harness_mntp_marks_its_run_killed(
    smollm2_dir: Path, shared_data: Path, tmp_path: Path, tally: Any
) -> None:
    lines = (shared_data / "STSBenchmark" / "train.tsv").read_text(encoding="utf-8").splitlines()
    text = tmp_path / "text.txt"
    text.write_text("\n".join(line.split("\t")[0] for line in lines[1:200]), encoding="utf-8")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tmp_path / "mntp.yaml"  # stopped long before its last step
    settings = mntp_experiment(tmp_path, text, steps=100_000, batch_size=2, eval_blocks=4)
    exp.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_unset=True)))
    proc = subprocess.Popen(
        [*HARNESS, "mntp", str(exp)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in proc.stdout:  # read the store only once it exists (a second process
            if line.startswith("MLflow run"):  # creating a new SQLite store collides)
                break
        client, deadline = MlflowClient(uri), time.monotonic() + 300
        run = None
        while run is None or not run.data.metrics:  # training has begun once step 0 is logged
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no MNTP metrics within 300 s"
            time.sleep(1)
            found = client.get_experiment_by_name(settings.name)
            runs = client.search_runs([found.experiment_id]) if found else []
            run = client.get_run(runs[0].info.run_id) if runs else None
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode not in (0, -signal.SIGTERM), f"exit code {proc.returncode}: {out}"
    assert "Traceback" not in out, out
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    tally(cases=1, faults=1)
