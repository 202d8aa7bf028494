"""Write every output of ``harness tables`` and log it to the newest sweep run."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.config import Experiment
from harness.tables.ablation import AblationTable, build_table
from harness.tables.collect import collect
from harness.tables.export import long_frame
from harness.tables.plots import VECTOR_FORMATS, category_plot, loss_plot, score_plot
from harness.tables.render import render_all
from synth.corpus import check_output_folder

ARTIFACT_DIR = "tables"  # under the parent (sweep) run
PLOTS = ("loss.png", "scores.png", "categories.png")


@dataclass(frozen=True)
class TablesResult:
    output_dir: Path
    files: list[Path]  # every file written, in a stable order
    table: AblationTable  # the numbers behind the files
    parent_run_id: str | None  # the sweep run the files were logged to (None: not logged)


def write_tables(
    exp: Experiment | None,
    *,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    output_dir: Path | None = None,
    log_to_mlflow: bool = True,
) -> TablesResult:
    """Regenerate ``results/<name>/`` (or ``tables.output_dir``, or ``output_dir``) from MLflow.

    Give the experiment file, or ``experiment_name`` (and ``tracking_uri``, default
    ``sqlite:///results/mlflow.db``) for an experiment whose file is not at hand: the grid order
    and ``tables`` settings then come from the newest sweep's
    logged ``experiment.yaml`` (else its ``grid`` parameter, else the runs' cells, sorted).
    ``tracking_uri`` overrides the file's. Files are written whole each time, byte for byte the
    same for the same runs; with ``log_to_mlflow`` they are also logged to the newest sweep run
    under ``tables/``.
    """
    collected = collect(exp, experiment_name, tracking_uri)
    where = (
        (exp.source or exp.name)
        if exp is not None
        else f"MLflow experiment {collected.experiment!r}"
    )
    table = build_table(collected, where)
    out = Path(
        output_dir or collected.settings.output_dir or Path("results") / _safe(collected.experiment)
    )
    check_output_folder(out, "the tables' folder", "the tables are written into a folder")
    out.mkdir(parents=True, exist_ok=True)

    files = []
    per_task = build_table(collected, where, per_task=True)
    for name, text in {**render_all(table), **render_all(per_task)}.items():
        (out / name).write_text(text, encoding="utf-8")
        files.append(out / name)
    long = long_frame(collected)
    long.write_parquet(out / "long.parquet")
    long.write_csv(out / "long.csv")
    files += [out / "long.parquet", out / "long.csv"]
    for name, made in zip(
        PLOTS,
        (
            loss_plot(table, collected.losses, out / PLOTS[0]),
            score_plot(table, out / PLOTS[1]),
            category_plot(table, out / PLOTS[2]),
        ),
    ):
        twins = [(out / name).with_suffix(f".{fmt}") for fmt in VECTOR_FORMATS]
        if made is None:
            for stale in (out / name, *twins):  # a stale plot from an earlier call would mislead
                stale.unlink(missing_ok=True)
        else:
            files += [made, *twins]

    parent = collected.parent_run_id if log_to_mlflow else None
    if parent is not None:
        _log(collected.resolved_uri, parent, files)
    return TablesResult(out, files, table, parent)


def _log(uri: str, run_id: str, files: list[Path]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    with tempfile.TemporaryDirectory(prefix="harness-tables-") as tmp:
        # one upload of a folder holding exactly these files (output_dir may hold other things)
        for f in files:
            (Path(tmp) / f.name).write_bytes(f.read_bytes())
        client.log_artifacts(run_id, tmp, ARTIFACT_DIR)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)
