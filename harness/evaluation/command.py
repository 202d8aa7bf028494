"""`harness eval MODEL_OR_RUN --suite NAME`: everything but the argument parsing.

MODEL_OR_RUN is, in this order:
- a folder saved by ``harness train`` (it holds ``embedder.json``): the trained model;
- an MLflow run id (32 hex digits) of a trial: its ``model`` artifact, or the folder its
  ``model_dir`` tag points to (``host:/path``, when the model was too big to log); the scores are
  then logged back to that run (``eval/*`` metrics, mteb's files under the ``mteb`` artifact);
- anything else is a base model (Hub id, local folder, ``packaged:...``), evaluated untrained with
  ``--pooling``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import EvalSettings, ModelSettings, Pooling, TrackingSettings, is_local_path
from harness.evaluation import scores
from harness.evaluation.instructions import ALL_TASKS
from harness.evaluation.run import EvalResult, evaluate_embedder
from harness.tracking import MODEL_DIR, redact_text

if TYPE_CHECKING:
    from harness.embedder import Embedder

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_ARTIFACT = "model"
MODEL_DIR_TAG = MODEL_DIR
EVAL_ARTIFACT = "mteb"


class ModelNotFoundError(ValueError):
    """MODEL_OR_RUN names no saved model, run or loadable base model; the message says what was tried."""


@dataclass(frozen=True)
class RunModel:
    run_id: str
    path: Path
    suite: str | None  # the run's own eval.suite, used when the command gives none


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
        instructions={ALL_TASKS: ""} if no_instructions else {},
    )
    result = evaluate_embedder(
        embedder, settings, output_dir=output_dir, data_dir=data_dir, overwrite=overwrite
    )
    if run is not None:
        _log_to_run(run.run_id, result, tracking_uri)
    from rich.console import Console

    Console().print(scores.markdown(result.frame), markup=False, highlight=False)
    Console(stderr=True).print(f"results: {result.result_dir}", markup=False, highlight=False)
    return result


def load_embedder(
    model_or_run: str,
    *,
    pooling: Pooling = "mean",
    base_settings: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
) -> tuple[Embedder, RunModel | None]:
    """The model MODEL_OR_RUN names (see the module docstring) and its run, if it is one."""
    from harness.embedder import Embedder

    run = _run_model(model_or_run, tracking_uri) if RUN_ID.match(model_or_run) else None
    if run is not None:
        return Embedder.load(run.path, device), run
    if (Path(model_or_run) / "embedder.json").is_file():
        return Embedder.load(model_or_run, device), None
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


def _client(tracking_uri: str | None):  # -> MlflowClient
    from mlflow import MlflowClient

    from harness.tracking import check_reachable, resolve_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or TrackingSettings().uri
    check_reachable(uri)
    return MlflowClient(tracking_uri=resolve_uri(uri))


def _run_model(run_id: str, tracking_uri: str | None) -> RunModel:
    """The trained model of an MLflow trial run: its logged artifact, else its ``model_dir`` tag."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ModelNotFoundError(
            f"MLflow run {run_id}: not found in {redact_text(client.tracking_uri)} ({e.message})"
        ) from None
    suite = run.data.params.get("eval.suite") or None
    if any(f.path == MODEL_ARTIFACT for f in client.list_artifacts(run_id)):
        into = Path(tempfile.mkdtemp(prefix=f"harness-eval-{run_id[:8]}-"))
        path = Path(client.download_artifacts(run_id, MODEL_ARTIFACT, str(into)))
        return RunModel(run_id, path, suite)
    tag = run.data.tags.get(MODEL_DIR_TAG)
    if tag:
        local = Path(tag.split(":", 1)[1] if ":" in tag and not Path(tag).exists() else tag)
        if (local / "embedder.json").is_file():
            return RunModel(run_id, local, suite)
        raise ModelNotFoundError(
            f"MLflow run {run_id}: its model is at {tag}, which is not a saved model on this machine"
        )
    raise ModelNotFoundError(
        f"MLflow run {run_id}: no '{MODEL_ARTIFACT}' artifact and no '{MODEL_DIR_TAG}' tag"
    )


def _log_to_run(run_id: str, result: EvalResult, tracking_uri: str | None) -> None:
    import time

    from mlflow.entities import Metric

    from harness.tracking import metric_name

    client = _client(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(metric_name(k), v, now, 0) for k, v in result.metrics.items()]
    )
    client.log_artifacts(run_id, str(result.result_dir), EVAL_ARTIFACT)
