"""`harness eval MODEL_OR_RUN --suite NAME`: everything but the argument parsing.

MODEL_OR_RUN is, in this order:
- a folder saved by ``harness train`` (it holds ``embedder.json``): the trained model;
- a folder written by ``harness export`` (it holds ``harness_embedding.json``): the exported
  model, loaded as sentence-transformers loads it (``harness/evaluation/exported.py``), with its
  own pooling, attention, format and adapter;
- an MLflow run id (32 hex digits) of a trial: its ``model`` artifact, or the folder its
  ``model_dir`` tag points to (``host:/path``, when the model was too big to log; see
  ``harness/saved_models.py``); the scores are then logged to a new child run of that run
  (``harness.role=evaluation``: ``eval/*`` metrics, mteb's files under the ``mteb`` artifact), so
  the trial's own scores, which the tables read, stay the sweep's;
- anything else is a base model (Hub id, local folder, ``packaged:...``), evaluated untrained with
  ``--pooling``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import EvalSettings, ModelSettings, Pooling, is_local_path
from harness.evaluation import scores
from harness.evaluation.instructions import ALL_TASKS
from harness.evaluation.run import EvalResult, evaluate_embedder
from harness.saved_models import RUN_ID, ModelNotFoundError, RunModel, client_for, run_model

if TYPE_CHECKING:
    from harness.embedder import Embedder
    from harness.evaluation.exported import ExportedEmbedder


def eval_command(
    model_or_run: str,
    suite: str | None,
    tasks: list[str],
    *,
    data_dir: str | None = None,
    output_dir: str = "results/eval",
    pooling: Pooling = "mean",
    batch_size: int = 32,
    max_docs: int | None = None,
    max_examples: int | None = None,
    no_instructions: bool = False,
    tracking_uri: str | None = None,
    overwrite: bool = False,
    device: str | None = None,
    base_settings: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Evaluate a saved model, an MLflow run's model or an untrained base model; print the table.

    ``base_settings`` (e.g. ``{"attention": "bidirectional", "template": "llm2vec", "init_adapter": ...}``)
    are ``model.*`` fields for an untrained base model; a saved model carries its own."""
    embedder, run = load_embedder(
        model_or_run,
        pooling=pooling,
        base_settings=base_settings,
        tracking_uri=tracking_uri,
        device=device,
    )
    if run is not None:
        suite = suite or (None if tasks else run.suite)
    settings = EvalSettings(
        suite=suite,
        tasks=tasks,
        batch_size=batch_size,
        max_docs=max_docs,
        max_examples=max_examples,
        instructions={ALL_TASKS: ""} if no_instructions else {},
    )
    result = evaluate_embedder(
        embedder, settings, output_dir=output_dir, data_dir=data_dir, overwrite=overwrite
    )
    from rich.console import Console

    Console().print(scores.markdown(result.frame), markup=False, highlight=False)
    err = Console(stderr=True)
    err.print(f"results: {result.result_dir}", markup=False, highlight=False)
    if run is not None:
        what = f"suite {suite}" if suite else ", ".join(Path(t).name for t in tasks)
        child = _log_to_run(run.run_id, result, what, tracking_uri)
        err.print(
            f"logged to MLflow run {child} (an evaluation of trial run {run.run_id}; the trial's "
            "own scores are unchanged)",
            markup=False,
            highlight=False,
        )
    return result


def load_embedder(
    model_or_run: str,
    *,
    pooling: Pooling = "mean",
    base_settings: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
    exports: bool = True,
) -> tuple[Embedder | ExportedEmbedder, RunModel | None]:
    """The model MODEL_OR_RUN names (see the module docstring) and its run, if it is one;
    ``exports=False`` refuses an exported folder (for commands that need the harness's model)."""
    from harness.embedder import Embedder

    run = run_model(model_or_run, tracking_uri) if RUN_ID.match(model_or_run) else None
    if run is not None:
        try:
            return Embedder.load(run.path, device), run
        finally:
            run.discard()  # the downloaded copy: loaded, it is not read again
    if (Path(model_or_run) / "embedder.json").is_file():
        return Embedder.load(model_or_run, device), None
    from harness.evaluation.exported import ExportedEmbedder, is_export

    if is_export(model_or_run):  # not a base model: its settings are in the folder
        if not exports:
            raise ModelNotFoundError(
                f"{model_or_run}: a `harness export` folder; give the trained model folder it "
                "was exported from, or its MLflow run id"
            )
        return ExportedEmbedder(model_or_run, device), None
    looks_local = "/" in model_or_run or model_or_run.startswith((".", "~"))
    if looks_local and is_local_path(model_or_run) and not Path(model_or_run).expanduser().exists():
        raise ModelNotFoundError(
            f"{model_or_run}: no such folder (give a folder saved by `harness train`, an MLflow "
            "run id, or a base model: Hub id owner/name, local folder or packaged:NAME)"
        )
    fields = {k: v for k, v in (base_settings or {}).items() if v is not None}
    if fields.get("init_adapter"):
        from harness.init_adapter import read_adapter

        if Path(fields["init_adapter"]).is_dir():  # its hash keeps mteb's cached results apart
            fields["init_adapter_sha256"] = read_adapter(Path(fields["init_adapter"])).sha256
    return Embedder.from_settings(
        ModelSettings(name=model_or_run, pooling=pooling, **fields), device
    ), None


def _log_to_run(run_id: str, result: EvalResult, what: str, tracking_uri: str | None) -> str:
    from harness.tracking import log_evaluation

    return log_evaluation(
        client_for(tracking_uri), run_id, result.metrics, result.result_dir, what=what
    )
