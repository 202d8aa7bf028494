"""Where a trained model is, for the commands that take ``MODEL_OR_RUN`` (``harness eval``,
``audit``, ``export``): a folder saved by ``harness train`` (it holds ``embedder.json``), or an
MLflow trial run id (32 hex digits), whose model is its ``model`` artifact or, when the model was
too big to log, the folder its ``model_dir`` tag points to (``host:/path``, on that host)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import TrackingSettings

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_ARTIFACT = "model"


class ModelNotFoundError(ValueError):
    """MODEL_OR_RUN names no saved model, run or loadable base model; the message says what was tried."""


@dataclass(frozen=True)
class RunModel:
    run_id: str
    path: Path
    suite: str | None  # the run's own eval.suite, used when the command gives none
    download: Path | None = None  # the temporary folder ``path`` was downloaded into, if any

    def discard(self) -> None:
        """Remove the downloaded copy (once the model is loaded); a folder on disk stays."""
        if self.download is not None:
            shutil.rmtree(self.download, ignore_errors=True)


def client_for(tracking_uri: str | None) -> Any:  # an MlflowClient
    """A client of ``tracking_uri`` ($MLFLOW_TRACKING_URI, else the default store), checked to answer."""
    from mlflow import MlflowClient

    from harness.tracking import check_reachable, resolve_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or TrackingSettings().uri
    check_reachable(uri)
    return MlflowClient(tracking_uri=resolve_uri(uri))


def run_model(run_id: str, tracking_uri: str | None) -> RunModel:
    """The trained model of an MLflow trial run: its logged artifact (downloaded), else the folder
    its ``model_dir`` tag names."""
    from mlflow.exceptions import MlflowException

    from harness.tracking import MODEL_DIR, redact_text

    client = client_for(tracking_uri)
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
        return RunModel(run_id, path, suite, download=into)
    tag = run.data.tags.get(MODEL_DIR)
    if tag:
        local = Path(tag.split(":", 1)[1] if ":" in tag and not Path(tag).exists() else tag)
        if (local / "embedder.json").is_file():
            return RunModel(run_id, local, suite)
        raise ModelNotFoundError(
            f"MLflow run {run_id}: its model is at {tag}, which is not a saved model on this machine"
        )
    raise ModelNotFoundError(
        f"MLflow run {run_id}: no '{MODEL_ARTIFACT}' artifact and no '{MODEL_DIR}' tag"
    )
