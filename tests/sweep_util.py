"""Shared set-up of the sweep tests: experiment files in tmp dirs, MLflow reads, a Ray PYTHONPATH,
and a sweep driver in its own process (to kill)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

TESTS = Path(__file__).resolve().parent


def worker_pythonpath() -> str:
    """PYTHONPATH that lets Ray workers import ``sweep_standins`` (set before Ray starts)."""
    return os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))


def write_experiment(
    tmp: Path, corpus_path: Path, name: str, build_with: Path | None = None, **sections: Any
) -> Path:
    """An experiment file with a tmp SQLite store; ``sections`` override top-level blocks.
    ``build_with`` a SYNTH.yaml: the sweep builds the corpus with `synth generate` if missing."""
    corpus: dict[str, Any] = {"path": str(corpus_path)}
    if build_with is not None:
        corpus["build"] = {"kind": "generate", "config": str(build_with)}
    data: dict[str, Any] = {
        "name": name,
        "corpus": corpus,
        "train": {"steps": 3, "batch_size": 8, "heldout_size": 16},  # fits the 120-row tiny corpus
        "resources": {"cpus_per_trial": 1},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        **sections,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def runs(tmp: Path, name: str, role: str | None = None) -> list:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    found = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if role is None or r.data.tags.get("harness.role") == role]


DRIVER = """
import sys
from pathlib import Path
import sweep_standins
from harness.sweep import run_sweep
exp, trial_fn = Path(sys.argv[1]), getattr(sweep_standins, sys.argv[2])
address = sys.argv[3] if len(sys.argv) > 3 else None
summary = run_sweep(exp, [], address=address, trial_fn=trial_fn, results_dir=exp.parent / "r")
sys.exit(summary.exit_code)
"""


def start_driver(
    exp: Path, trial_fn: str, address: str | None = None, **env: str
) -> subprocess.Popen[str]:
    """``run_sweep`` of ``exp`` with ``sweep_standins.<trial_fn>`` as a process of its own (in its
    own process group, so a kill of the group takes a local Ray it started with it, like a lost
    machine); stdout and stderr merged into ``.stdout``."""
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(exp), trial_fn, *([address] if address else [])],
        env={
            **os.environ,
            "PYTHONPATH": worker_pythonpath(),
            "RAY_USAGE_STATS_ENABLED": "0",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
