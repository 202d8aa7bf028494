"""``harness train``: one configuration, no Ray, tracked as one stand-alone MLflow run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from harness.config import Experiment, path_part, trial_key
from harness.corpora import check_corpus_fits, load_corpus
from harness.experiment_file import (
    apply_cell,
    cell_label,
    load_experiment,
    parse_cell,
    validated_cells,
)
from harness.init_adapter import check_init_adapter, prepare_init_adapter
from harness.mntp import mntp_builder
from harness.tracking import (
    CORPUS_SHA,
    GIT_SHA,
    LEVEL_ORDER,
    MLFLOW_MODEL,
    MODEL_DIR,
    MODEL_URI,
    TRIAL_KEY,
    Tracker,
    describe_error,
    git_sha,
)
from harness.train import TrainResult, train_one
from synth import outputs
from synth.corpus import Corpus

COMMAND = "harness train"  # what synth.outputs.MARKER records in its output folder
MODEL, MTEB = "model", "mteb"  # what it writes there (train.py saves the model), and the
# MLflow model folder while it logs it (mlflow_model.NAME)


def train_single(
    experiment: Path,
    overrides: Sequence[str] = (),
    cell_items: Sequence[str] = (),
    *,
    output: Path | None = None,
    track: bool = True,
    evaluate: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """Train the file's base settings (or one grid cell), score it, optionally evaluate it."""
    console = console or Console(stderr=True)
    base = load_experiment(experiment, overrides)
    validated_cells(base)  # the whole file is checked, whichever cell runs
    cell = parse_cell(cell_items, base)
    if base.grid and not cell:
        console.print(
            f"[dim]training the base settings; pick a grid cell with --cell (grid: {', '.join(base.grid)})[/]"
        )
    exp = apply_cell(base, cell)
    check_init_adapter(exp)
    if evaluate and exp.eval.enabled:  # before training: a typo in a task name costs nothing
        from harness.evaluation.suites import check_eval

        check_eval(exp.eval, where=exp.source)
    label = cell_label(cell) if cell else "train"
    corpus = load_corpus(exp, console)
    prepare_init_adapter(exp, build=mntp_builder(corpus, console), say=console.print)
    check_corpus_fits(exp, corpus)
    key = trial_key(exp, corpus.sha256)
    out = output or Path("results") / "runs" / path_part(exp.name) / path_part(f"{label}-{key}")
    _claim_output(exp, out, corpus)

    tracker = run_id = None
    if track:
        tracker = Tracker(exp.tracking, exp.name, exp.source)
        run_id = tracker.start_trial_run(
            exp,
            parent_id=None,
            name=label,
            key=key,
            cell=cell,
            tags={CORPUS_SHA: corpus.sha256, GIT_SHA: git_sha()},
            role="train",
        )
        console.print(f"MLflow run {run_id} in experiment {exp.name!r} ({tracker.display_uri})")

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        if tracker is not None:
            tracker.log_metrics(run_id, metrics, step=step)

    try:
        result = train_one(
            exp,
            corpus,
            output_dir=out,
            on_metrics=on_metrics,
            progress=True,
            name=f"{exp.name}/{label}-{key}",
            revision=key,
        )
        if result.heldout_before:
            console.print("held-out before training: " + _scores(result.heldout_before))
        console.print("held-out: " + _scores(result.heldout))
        console.print(
            f"trained {result.steps} steps in {result.seconds:.0f} s "
            f"({result.seconds / max(result.steps, 1):.2f} s/step, "
            f"{result.steps * exp.train.batch_size / max(result.seconds, 1e-9):.2f} queries/s)"
        )
        scores = dict(result.heldout)
        if evaluate and exp.eval.enabled:
            from harness.embedder import Embedder
            from harness.evaluation.run import evaluate_embedder

            evaluated = evaluate_embedder(
                Embedder.load(result.model_dir),
                exp.eval,
                output_dir=out / MTEB,
                name=f"{exp.name}/{label}-{key}",
            )
            scores.update(evaluated.metrics)  # eval/<Task>, eval/<Category>, eval/avg
            if tracker is not None:
                tracker.log_metrics(run_id, evaluated.metrics, step=exp.train.steps)
                tracker.log_artifacts(run_id, Path(evaluated.result_dir), "mteb")
        if tracker is not None:
            tags = {
                MODEL_DIR: str(Path(result.model_dir).resolve()),
                MODEL_URI: f"runs:/{run_id}/model",
                LEVEL_ORDER: ",".join(map(str, result.level_order)),
            }
            tracker.log_artifacts(run_id, Path(result.model_dir), "model")
            if exp.tracking.log_model:
                tags[MLFLOW_MODEL] = _log_mlflow_model(tracker, run_id, result, out, key, scores)
            tracker.set_tags(run_id, tags)
            tracker.finish_trial(run_id)
    except BaseException as e:
        if tracker is not None:
            tracker.fail_trial(run_id, describe_error(e))
        raise
    return result


def _claim_output(exp: Experiment, out: Path, corpus: Corpus) -> None:
    """Train into a folder this command made (again: same key, same folder) or a new one, never
    into a user's folder nor the corpus or init adapter (synth/outputs.py). A folder from before
    the marker is proven ours by its saved model."""
    from harness.embedder import META_FILE
    from harness.init_adapter import local_folder
    from harness.mlflow_model import NAME

    entries = (MODEL, MTEB, NAME)
    inputs = [p for p in (corpus.path, local_folder(exp)) if p is not None]
    outputs.adopt(out, COMMAND, entries, (out / MODEL / META_FILE).is_file())
    outputs.claim(out, COMMAND, entries, inputs=inputs, what="--output")


def _log_mlflow_model(
    tracker: Tracker,
    run_id: str,
    result: TrainResult,
    out: Path,
    key: str,
    metrics: dict[str, float],
) -> str:
    """The trained model as a registrable MLflow model of the run (``tracking.log_model``)."""
    import shutil

    from harness.export import export_mlflow_model
    from harness.mlflow_model import NAME

    target = out / NAME
    shutil.rmtree(target, ignore_errors=True)
    export_mlflow_model(result.model_dir, target, metrics=metrics, tags={TRIAL_KEY: key})
    try:
        return tracker.log_model(run_id, target)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _scores(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in sorted(metrics.items()))
