"""Multi-node as users run it, on loopback: a Ray head (`ray start --head`), a second node that
joins it (`ray start --address`), each with its own resources, an MLflow tracking server, and
`harness sweep --address` running one trial on two Ray Train workers placed SPREAD, so one per
node. Nothing is shared through the file system on purpose: the corpus travels in Ray's object
store, the model to the tracking server through the driver, the checkpoints to the configured
storage path (a folder here; a bucket or shared mount on a real cluster)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from synth.processes import stop_groups

HARNESS = "import sys; from harness.cli import app; sys.argv[0] = 'harness'; app()"
RAY = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process in its own group, so the test stops it with everything it started."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every group at once (Ray's processes shut down together), SIGKILL what lingers, and
    wait until the groups are empty, so no raylet outlives the test."""
    assert stop_groups(procs, grace_s=10, kill_wait_s=10), "a cluster process outlived SIGKILL"


def _wait_for(what: str, ready, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        time.sleep(1)
    pytest.fail(f"{what} did not come up in {timeout:.0f} s:\n{log.read_text(errors='replace')}")


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _nodes(address: str, env: dict[str, str]) -> list[str]:
    status = subprocess.run(
        [sys.executable, "-c", RAY, "status", f"--address={address}"],
        capture_output=True,
        text=True,
        env=env,
    )
    return re.findall(r"node_([0-9a-f]{40,})", status.stdout)


CURRENT_CLUSTER = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")


def _current_cluster() -> str | None:
    return CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.is_file() else None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(Ray address, MLflow URI, the environment every process of the cluster shares)."""
    env = {
        **os.environ,
        # Ray's token authentication: every node and the driver hold the same token
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray_port, mlflow_port = _free_port(), _free_port()
    address = f"127.0.0.1:{ray_port}"
    # its own temp dir (short: Ray's socket paths must fit in 107 bytes)
    temp = Path(tempfile.mkdtemp(prefix="nm-ray-", dir="/tmp"))
    # `ray start --head` also records itself as this machine's current cluster, which every later
    # ray.init() without an address would try to join, gone by then: put back what was there
    before = _current_cluster()
    ray = [sys.executable, "-c", RAY, "start", "--block", "--node-ip-address=127.0.0.1"]
    node = ["--num-cpus=1", "--disable-usage-stats"]
    head = [f"--port={ray_port}", f"--temp-dir={temp}", "--include-dashboard=false"]
    mlflow = ["--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"]
    store = ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    store += ["--artifacts-destination", str(tmp_path / "server-artifacts")]
    procs = []
    try:
        head_node = [*ray, "--head", *head, '--resources={"head_node": 1}', *node]
        procs.append(_start(head_node, tmp_path / "head.log", env))
        server = [sys.executable, "-m", "mlflow", "server", *mlflow, *store]
        procs.append(_start(server, tmp_path / "mlflow.log", env))
        _wait_for("the Ray head", lambda: _answers(ray_port), 60, tmp_path / "head.log")
        second = [*ray, f"--address={address}", '--resources={"second_node": 1}', *node]
        procs.append(_start(second, tmp_path / "node.log", env))
        _wait_for(
            "the second node", lambda: len(_nodes(address, env)) == 2, 90, tmp_path / "node.log"
        )
        _wait_for("the MLflow server", lambda: _answers(mlflow_port), 90, tmp_path / "mlflow.log")
        yield address, f"http://127.0.0.1:{mlflow_port}", env
    finally:
        _stop(procs)
        shutil.rmtree(temp, ignore_errors=True)
        current = CURRENT_CLUSTER
        if before is None:
            current.unlink(missing_ok=True)
        else:
            current.write_text(before)


@pytest.mark.timeout(900)
def test_a_two_worker_trial_spreads_over_two_nodes_and_tracks_to_a_server(
    cluster, tmp_path, tiny_corpus_dir
):
    address, tracking_uri, env = cluster
    experiment = {
        "name": "two-nodes",
        "corpus": {"path": str(tiny_corpus_dir)},
        "model": {
            "name": "packaged:all-minilm-l6-v2",
            "pooling": "mean",
            "lora": {"r": 4},
            "max_query_length": 24,
            "max_doc_length": 24,
        },
        "train": {"steps": 3, "batch_size": 8, "heldout_size": 16, "checkpoint_every": 1},
        "eval": {"enabled": False},
        "resources": {
            "cpus_per_trial": 1,
            "workers_per_trial": 2,
            "placement_strategy": "SPREAD",
            "storage_path": str(tmp_path / "storage"),
        },
        "tracking": {"uri": tracking_uri, "system_metrics": False},
    }
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(experiment))
    driver = tmp_path / "driver"  # its own working directory: results/ lands there
    driver.mkdir()
    sweep = subprocess.run(
        [sys.executable, "-c", HARNESS, "sweep", str(path), "--address", address],
        cwd=driver,
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "100"},
        timeout=600,
    )
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr

    client = MlflowClient(tracking_uri)
    found = client.search_runs(
        [client.get_experiment_by_name("two-nodes").experiment_id],
        filter_string="tags.`harness.role` = 'trial'",
    )
    (run,) = found
    assert run.info.status == "FINISHED"
    workers = run.data.tags["harness.worker_nodes"].split(",")
    nodes = _nodes(address, env)
    assert len(set(workers)) == 2 and set(workers) == set(nodes), (workers, nodes)  # SPREAD
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3]
    # the model reached the server through the driver (no node reads another's disk)
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert list((tmp_path / "server-artifacts").rglob("adapter_model.safetensors"))
    # the checkpoints went to the configured storage path, the last two kept
    assert len(list((tmp_path / "storage").rglob("checkpoint_*/state.pt"))) == 2
    # quiet: no MLflow run links, no Ray Train helper chatter
    assert "View run" not in sweep.stdout and "multiple active Ray" not in sweep.stdout
