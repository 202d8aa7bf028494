"""No wrong answer with exit 0 (issue 31, class 5): `harness ui` on a port another MLflow UI holds,
a corpus whose negatives are empty texts, and a tracking URI that carries credentials, each against
a real MLflow server, real CLI processes and real corpus files."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from faults_util import assert_clean_failure
from mlflow import MlflowClient
from sweep_util import write_experiment
from typer.testing import CliRunner

from harness.cli import app
from harness.config import TrackingSettings
from harness.tracking import Tracker
from harness.ui import start_ui, stop_ui
from synth.corpus import MANIFEST_FILE, SAMPLES_FILE, sha256_file

pytestmark = pytest.mark.faults
HARNESS = [sys.executable, "-c", "from harness.cli import app; app()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def other_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A real MLflow UI (store "A") on a free loopback port, for the whole module."""
    store = tmp_path_factory.mktemp("store-a") / "mlflow.db"
    uri = f"sqlite:///{store}"
    Tracker(TrackingSettings(uri=uri), "only-in-a")
    port = _free_port()
    proc = start_ui(uri, port)
    try:
        yield uri, port
    finally:
        stop_ui(proc)


def test_harness_ui_refuses_a_port_another_ui_serves(
    other_ui: tuple[str, int], tmp_path: Path, tally: Any
) -> None:
    """It printed its URL and exited 0 while the port served the other store."""
    _, port = other_ui
    mine = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(TrackingSettings(uri=mine), "only-in-b")
    done = subprocess.run(
        [*HARNESS, "ui", mine, "--port", str(port), "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert_clean_failure(done.returncode, out, f"port {port}", "already in use")
    assert "http://" not in out, f"a URL was printed: {out}"
    assert len(out.strip().splitlines()) == 1, out
    tally(cases=1, faults=1)


def test_a_tracking_uri_with_credentials_reaches_the_server(
    other_ui: tuple[str, int], tally: Any
) -> None:
    """MLflow's client sends ``user:password@`` as basic auth; the harness's own reachability
    check looked the userinfo up as part of the host name and refused the URI."""
    store_uri, port = other_ui
    secret = "s3cret-pw"
    tracker = Tracker(TrackingSettings(uri=f"http://alice:{secret}@127.0.0.1:{port}"), "via-creds")
    assert secret not in tracker.display_uri and f"127.0.0.1:{port}" in tracker.display_uri
    # the experiment really is in the served store
    assert MlflowClient(store_uri).get_experiment_by_name("via-creds") is not None
    tally(cases=1, searched=1)


def _blank_negatives(corpus: Path) -> None:
    """Rows 0-2 get neg_2 "" and rows 3-4 neg_4 whitespace; the manifest is made to match."""
    frame = pl.read_parquet(corpus / SAMPLES_FILE)
    row = pl.int_range(frame.height)
    frame.with_columns(
        pl.when(row < 3).then(pl.lit("")).otherwise(pl.col("neg_2")).alias("neg_2"),
        pl.when(row.is_between(3, 4)).then(pl.lit(" \t")).otherwise(pl.col("neg_4")).alias("neg_4"),
    ).write_parquet(corpus / SAMPLES_FILE)
    manifest = json.loads((corpus / MANIFEST_FILE).read_text())
    manifest["samples_sha256"] = sha256_file(corpus / SAMPLES_FILE)
    (corpus / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_corpus_with_empty_negatives_is_refused_before_training(
    tmp_path: Path, tiny_corpus_dir: Path, tally: Any
) -> None:
    """Such a corpus trained to FINISHED and inflated held-out recall@1 (0.625 against 0.25)."""
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, corpus)
    _blank_negatives(corpus)
    exp = write_experiment(tmp_path, corpus, "blank-negatives")
    for command in ("sweep", "train"):
        result = CliRunner().invoke(app, [command, str(exp)])
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert_clean_failure(
            result.exit_code,
            result.output,
            str(corpus / SAMPLES_FILE),
            "neg_2 in 3 row(s)",
            "neg_4 in 2 row(s)",
        )
    assert not (tmp_path / "mlflow.db").exists(), "it got past the corpus"
    tally(cases=2, faults=2, rows=5)
