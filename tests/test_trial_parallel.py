"""A trial on two Ray Train workers (``resources.workers_per_trial: 2``, gloo on the CPU) inside a
real sweep: the same MLflow child run, trial key and losses as the one-worker trial of the cell."""

from __future__ import annotations

import math

import pytest
from mlflow import MlflowClient
from sweep_util import runs, write_experiment

from harness.cluster import cluster_capacity
from harness.config import ConfigError
from harness.experiment_file import load_experiment
from harness.sweep import run_sweep
from harness.tracking import WORKER_NODES

# SmolLM2 has no dropout and LoRA gets none: the two-worker step is the one-worker step exactly
# (tests/test_distributed.py), so only float rounding tells the runs apart.
MODEL = {
    "name": "packaged:smollm2-135m-instruct",
    "lora": {"r": 4, "dropout": 0.0},
    "max_query_length": 16,
    "max_doc_length": 16,
}
TRAIN = {"steps": 3, "batch_size": 4, "warmup_steps": 0, "heldout_size": 8, "device": "cpu"}
TOLERANCE = 1e-4


def _sweep(tmp_path, corpus, workers: int, **train):
    folder = tmp_path / f"workers-{workers}"
    folder.mkdir()
    exp = write_experiment(
        folder,
        corpus,
        "parallel",
        model=MODEL,
        train={**TRAIN, **train},
        eval={"enabled": False},
        resources={"cpus_per_trial": 1, "workers_per_trial": workers},
    )
    summary = run_sweep(exp, [], results_dir=folder / "results")
    assert summary.exit_code == 0, [r.error for r in summary.records]
    (run,) = runs(folder, "parallel", "trial")
    history = MlflowClient(summary.tracking_uri).get_metric_history(run.info.run_id, "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    return run, losses, MlflowClient(summary.tracking_uri)


def test_two_workers_give_the_one_worker_trial(ray_instance, tmp_path, tiny_corpus_dir):
    one, one_losses, _ = _sweep(tmp_path, tiny_corpus_dir, 1)
    # with checkpoints (not in the trial key): rank 0's state reaches Tune through the object store
    two, two_losses, client = _sweep(tmp_path, tiny_corpus_dir, 2, checkpoint_every=1)

    assert two.info.status == "FINISHED"
    assert two.data.tags["trial_key"] == one.data.tags["trial_key"]  # resources are not in the key
    # the same tags, and where each worker ran (harness.worker_nodes, for multi-worker trials)
    assert set(two.data.tags) == set(one.data.tags) | {WORKER_NODES}
    assert len(two.data.tags[WORKER_NODES].split(",")) == 2
    assert set(two.data.metrics) == set(one.data.metrics)
    assert len(two_losses) == len(one_losses) == TRAIN["steps"]
    difference = max(abs(a - b) for a, b in zip(one_losses, two_losses))
    print(f"\nlargest train/loss difference, 2 workers vs 1: {difference:.3g}")
    assert difference < TOLERANCE, (one_losses, two_losses)
    for name, value in one.data.metrics.items():
        if name.startswith("heldout/"):
            assert math.isclose(two.data.metrics[name], value, abs_tol=TOLERANCE), name
    assert "model" in {a.path for a in client.list_artifacts(two.info.run_id)}
    assert two.data.params["resources.workers_per_trial"] == "2"
    kept = sorted((tmp_path / "workers-2" / "results" / "ray").rglob("checkpoint_*/state.pt"))
    assert len(kept) == 2  # steps 1 and 2 (none after the last), train.keep_checkpoints 2
    assert not list((tmp_path / "workers-2" / "results" / "models").rglob("state.pt"))


def test_capacity_counts_every_worker_of_a_trial(ray_instance):
    # the test cluster: one node of 2 CPUs
    assert cluster_capacity({"CPU": 1.0}) == 2
    assert cluster_capacity({"CPU": 1.0}, workers=2) == 1
    assert cluster_capacity({"CPU": 1.0}, workers=3) == 0


def test_workers_need_a_batch_to_share(tmp_path, tiny_corpus_dir):
    exp = write_experiment(
        tmp_path,
        tiny_corpus_dir,
        "small",
        train={"batch_size": 2},
        resources={"workers_per_trial": 3},
    )
    with pytest.raises(ConfigError, match=r"workers_per_trial 3 needs train\.batch_size >= 3"):
        load_experiment(exp)
    with pytest.raises(ConfigError, match="give each worker whole GPUs"):
        load_experiment(exp, ["train.batch_size=8", "resources.gpus_per_trial=0.5"])
