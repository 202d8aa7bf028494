"""A simulated 2-node Ray cluster on this machine: trials spread over both nodes, never more at once
on a node than its (fake) GPUs allow. Each node offers one ``fake_gpu`` custom resource standing in
for a GPU (this machine has none); the sweep joins the cluster through ``address=`` like
``harness sweep --address``."""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import datetime

import pytest
import sweep_standins
from sweep_util import runs, worker_pythonpath, write_experiment

from harness.sweep import run_sweep


@pytest.fixture(scope="module")
def two_node_cluster():
    from ray.cluster_utils import Cluster

    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", worker_pythonpath())
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"fake_gpu": 1}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, resources={"fake_gpu": 1})
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()
    mp.undo()


def test_trials_spread_over_nodes_without_oversubscription(
    two_node_cluster, tmp_path, tiny_corpus_dir
):
    exp = write_experiment(
        tmp_path,
        tiny_corpus_dir,
        "cluster",
        grid={"seed": [0, 1, 2, 3]},
        resources={"cpus_per_trial": 0.5, "custom": {"fake_gpu": 1}},
    )
    summary = run_sweep(
        exp,
        [],
        address=two_node_cluster.address,
        trial_fn=sweep_standins.sleepy,
        results_dir=tmp_path / "r",
    )
    assert summary.exit_code == 0 and summary.count("FINISHED") == 4
    assert summary.concurrency == 2  # two nodes x one fake GPU

    spans = defaultdict(list)  # node id -> [(start, end)] as measured inside the trials
    for run in runs(tmp_path, "cluster", "trial"):
        t = run.data.tags
        span = (
            datetime.fromisoformat(t["harness.started_at"]),
            datetime.fromisoformat(t["harness.ended_at"]),
        )
        spans[t["harness.node_id"]].append(span)
    assert len(spans) == 2, "both nodes ran trials"
    for node, intervals in spans.items():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end, f"node {node[:8]} ran two trials at once: {intervals}"
