"""Evaluate one embedding model on a suite: what `harness eval` and every sweep trial call.

Results go through mteb's ``ResultCache`` rooted at ``output_dir``, under
``results/<name>/<revision>/<experiment>/``: ``<Task>.json`` (mteb's own result files),
``model_meta.json``, and ours: ``scores.csv`` (one row per task), ``scores.md`` and
``summary.json`` (the metrics). Re-running with the same name resumes (finished tasks are read
back); ``overwrite=True`` evaluates everything again.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from harness.config import EvalSettings
from harness.evaluation import scores
from harness.evaluation.encoder import EmbedderEncoder, TextEmbedder
from harness.evaluation.instructions import Instructions
from harness.evaluation.local_tasks import LocalFolderTask, LocalTaskError
from harness.evaluation.suites import check_hub_access, resolve_tasks, task_entries
from synth.textfiles import TextFileError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    frame: pl.DataFrame  # one row per task: task, category, main_score, score, split, seconds, note
    metrics: dict[str, float]  # eval/<Task>, eval/<Category>, eval/avg
    result_dir: Path  # mteb's result files and ours, to log as artifacts


def evaluate_embedder(
    embedder: TextEmbedder,
    eval_settings: EvalSettings,
    *,
    output_dir: str | os.PathLike[str],
    name: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_task: Callable[[str], None] | None = None,
) -> EvalResult:
    """Score ``embedder`` on ``eval_settings``' suite and tasks with mteb.

    ``name`` (default ``embedder.name``) keys mteb's result cache: give each trained model its own
    (e.g. the trial key) so that two models never share cached results. ``data_dir`` replaces
    ``${NM_SHARED_DATA}`` in local task paths. Named tasks whose Hub data is out of reach fail
    before any model work starts. ``on_task`` gets one line per finished task ("task k/n NAME:
    score, seconds, ETA"): a trial sends it to the driver, which prints it.
    """
    tasks = resolve_tasks(
        task_entries(eval_settings),
        data=data_dir,
        max_docs=eval_settings.max_docs,
        max_examples=eval_settings.max_examples,
    )
    check_hub_access(tasks)
    instructions = Instructions(eval_settings.instructions)
    capped = eval_settings.max_docs is not None and any(
        isinstance(t, LocalFolderTask) and t.metadata.type == "Retrieval" for t in tasks
    )
    local = any(isinstance(t, LocalFolderTask) for t in tasks)
    experiment = {  # mteb's result cache keeps results of other caps apart
        "max_docs": eval_settings.max_docs if capped else None,
        "max_examples": eval_settings.max_examples if local else None,
        "instructions": instructions.fingerprint(),
    }
    encoder = EmbedderEncoder(
        embedder,
        name=name,
        instructions=instructions,
        symmetric_max_length=getattr(embedder, "max_doc_length", None),
        experiment_kwargs={k: v for k, v in experiment.items() if v is not None},
        progress=progress,
    )
    import mteb
    from mteb.cache import ResultCache

    cache = ResultCache(Path(output_dir))
    meta = encoder.mteb_model_meta
    result_dir = cache.get_task_result_path("-", meta).parent
    rows: list[scores.TaskScore] = []
    with _quiet_mteb():
        for i, task in enumerate(tasks, 1):
            label = f"[{i}/{len(tasks)}] {task.metadata.name}"
            start = time.perf_counter()
            try:
                model_result = mteb.evaluate(
                    encoder,
                    task,
                    cache=cache,
                    overwrite_strategy="always" if overwrite else "only-missing",
                    encode_kwargs={
                        "batch_size": eval_settings.batch_size,
                        "show_progress_bar": False,
                    },
                    show_progress_bar=False,
                    co2_tracker=False,
                )
            except (LocalTaskError, TextFileError):
                raise  # the user's data: already one line naming the file
            except Exception as e:
                raise RuntimeError(
                    f"evaluating {meta.name} on {task.metadata.name} failed: {e}"
                ) from e
            result = model_result.task_results[0]
            row = scores.task_score(
                result,
                category=task.metadata.type,
                main_score=task.metadata.main_score,
                seconds=result.evaluation_time or time.perf_counter() - start,
                note=getattr(task, "note", ""),
            )
            rows.append(row)
            if on_task is not None:
                spent = sum(r.seconds for r in rows)
                eta = spent / i * (len(tasks) - i)
                on_task(
                    f"evaluated {label} ({row.main_score} {row.score:.4f}, "
                    f"{row.seconds:.0f} s; ETA {eta:.0f} s)"
                )
            if progress:
                _say(
                    f"{label}: {row.main_score} {row.score:.4f} ({row.seconds:.0f} "
                    f"s){'  ' + row.note if row.note else ''}"
                )
    df = scores.frame(rows)
    metrics = scores.metrics(df)
    _write(result_dir, df, metrics, meta_name=meta.name, revision=meta.revision)
    return EvalResult(frame=df, metrics=metrics, result_dir=result_dir)


def _write(result_dir: Path, df: pl.DataFrame, metrics: dict[str, float], **about: Any) -> None:
    result_dir.mkdir(parents=True, exist_ok=True)
    df.write_csv(result_dir / "scores.csv")
    (result_dir / "scores.md").write_text(scores.markdown(df), encoding="utf-8")
    summary = {
        **about,
        "metrics": metrics,
        "notes": {r["task"]: r["note"] for r in df.iter_rows(named=True) if r["note"]},
    }
    (result_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _say(line: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(line)


@contextmanager
def _quiet_mteb() -> Iterator[None]:
    """mteb warns that the classic tasks are superseded (they are the paper's), logs per task, and
    ``datasets`` draws a bar per small transform: our own line per task says what matters."""
    from datasets.utils import logging as ds_logging

    logger = logging.getLogger("mteb")
    level = logger.level
    bars = ds_logging.is_progress_bar_enabled()
    logger.setLevel(max(level, logging.ERROR))
    ds_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(superseded|No prompt found).*")
        try:
            yield
        finally:
            logger.setLevel(level)
            if bars:
                ds_logging.enable_progress_bar()
