"""Keep the committed MLflow store of the small ablations small (run by run.sh after each sweep).

Drops per-step histories nothing here reads: the machine load (``system/*``), ``train/lr`` (the
schedule, derivable from the config) and ``train/examples_per_s``, and every history of a run that
did not finish (a FAILED or KILLED attempt: its run, tags and final values stay). What the tables,
the plots and resumption read is kept: tags, params, each run's latest values, and the per-step
``train/loss`` and ``train/level`` of finished runs. Then VACUUM.

    python experiments/small/compact_store.py results/small/mlflow.db
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

DROPPED_HISTORIES = ("system/%", "train/lr", "train/examples_per_s")


def compact(path: Path) -> tuple[int, int]:
    """Compact the SQLite store at ``path``; return its size in bytes before and after."""
    before = path.stat().st_size
    with sqlite3.connect(path) as db:
        for pattern in DROPPED_HISTORIES:
            db.execute("DELETE FROM metrics WHERE key LIKE ?", (pattern,))
        db.execute(
            "DELETE FROM metrics WHERE run_uuid IN "
            "(SELECT run_uuid FROM runs WHERE status != 'FINISHED')"
        )
    with sqlite3.connect(path) as db:
        db.execute("VACUUM")
    return before, path.stat().st_size


if __name__ == "__main__":
    store = Path(sys.argv[1] if len(sys.argv) > 1 else "results/small/mlflow.db")
    if not store.is_file():
        sys.exit(f"{store}: no such MLflow store")
    old, new = compact(store)
    print(f"{store}: {old / 2**20:.1f} MiB -> {new / 2**20:.1f} MiB")
