"""Numbers for results/small/README.md, read from the committed store and the regenerated tables:
per row of each ablation, mean ± sample std over seeds (n) of every task score and of the held-out
recall@1 before and after training, and the table's paired cluster-bootstrap interval against the
baseline row.

    python experiments/small/report.py            # from the repository root, after run.sh
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from mlflow import MlflowClient

from harness.tracking import ROLE

STORE = "sqlite:///results/small/mlflow.db"
ABLATIONS = {  # experiment name -> (results folder, row axis)
    "small-pooling": ("results/small/pooling", "model.pooling"),
    "small-pooling-causal": ("results/small/pooling-causal", "model.pooling"),
    "small-schedule": ("results/small/schedule", "train.strategy"),
}
METRICS = ("heldout_base/recall_at_1", "heldout/recall_at_1", "eval/BIOSSES", "eval/STS16",
           "eval/STSBenchmark", "eval/STS13", "eval/avg")  # fmt: skip


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def report(client: MlflowClient, name: str, folder: str, axis: str) -> list[str]:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return [f"## {name}", "", "not run yet", ""]
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`{ROLE}` = 'trial' and attributes.status = 'FINISHED'",
        max_results=1000,
    )
    by_row: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        row = run.data.params.get(axis, "?")
        seeds[row].add(run.data.params.get("train.seed", "?"))
        for m in METRICS:
            if m in run.data.metrics:
                by_row[row][m].append(run.data.metrics[m])
    present = [m for m in METRICS if any(by_row[r][m] for r in by_row)]
    lines = [f"## {name} ({len(runs)} finished trials)", ""]
    lines.append("| " + " | ".join([axis.split(".")[-1], "n", *present]) + " |")
    lines.append("|" + "---|" * (len(present) + 2))
    for row in by_row:
        lines.append(
            "| "
            + " | ".join([row, str(len(seeds[row])), *(fmt(by_row[row][m]) for m in present)])
            + " |"
        )
    table = Path(folder) / "ablation.csv"
    if table.is_file():
        lines += [
            "",
            "Paired cluster bootstrap against the baseline row (tables' `test_*` columns, x100):",
            "",
        ]
        with table.open(encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r["test_diff"]:
                    lines.append(
                        f"- {r[axis.split('.')[-1]]}: {r['test_metric']} Δ {100 * float(r['test_diff']):+.2f}, "
                        f"95 % interval [{100 * float(r['test_ci_low']):+.2f}, {100 * float(r['test_ci_high']):+.2f}], "
                        f"{r['test_pairs']} (seed, task) pairs over {r['test_seeds']} seeds, "
                        f"sign-flip p = {float(r['test_sign_flip_p']):.3g}"
                    )
    return [*lines, ""]


def main() -> None:
    client = MlflowClient(tracking_uri=STORE)
    out: list[str] = []
    for name, (folder, axis) in ABLATIONS.items():
        out += report(client, name, folder, axis)
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
