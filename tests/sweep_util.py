"""Shared set-up of the sweep tests: experiment files in tmp dirs, MLflow reads, a Ray PYTHONPATH."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

TESTS = Path(__file__).resolve().parent


def worker_pythonpath() -> str:
    """PYTHONPATH that lets Ray workers import ``sweep_standins`` (set before Ray starts)."""
    return os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))


def write_experiment(tmp: Path, corpus: Path, name: str, **sections: Any) -> Path:
    """An experiment file with a tmp SQLite store; ``sections`` override top-level blocks."""
    data: dict[str, Any] = {
        "name": name,
        "corpus": {"path": str(corpus)},
        "train": {"steps": 3},
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
