"""An exported model as an MLflow model: the folder (sentence-transformers flavour), its logging to
a run as an MLflow logged model, and its registration.

The flavour's own ``log_model`` wants a loaded ``SentenceTransformer`` (which it saves again) and an
active run in this process; a sweep's models are written on the workers and logged by the driver.
So the folder is written where the model is (:func:`mlflow_model_folder`, files only: no tracking
store) and logged wherever the store is (:func:`log_mlflow_model`, through a client, as
``Model.log`` does: a logged model of the run, its files, the run's output).

Loading it back: ``mlflow.sentence_transformers.load_model(uri)`` gives the SentenceTransformer,
``mlflow.pyfunc.load_model(uri).predict(texts, params={"prompt_name": "query"})`` the vectors
(the flavour passes ``trust_remote_code=True``; the folder ships its module's code).
"""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

NAME = "st_model"  # the logged model's name, and the artifact a trial ships it under
FLAVOR = "sentence_transformers"


def mlflow_model_folder(st_folder: Path, into: Path, *, copy: bool = False) -> Path:
    """An MLflow model around an exported folder, written into ``into`` (which must not exist);
    the exported folder is moved there (``copy``: copied, or hard-linked where possible).

    The pyfunc signature takes a column of strings and returns float32 vectors, with params
    ``prompt_name`` (``document`` by default, ``query`` for queries) and ``instruction`` (empty).
    Pip requirements are given, not inferred (MLflow would load the model in a subprocess)."""
    import mlflow.sentence_transformers
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    config = json.loads((st_folder / "config.json").read_text(encoding="utf-8"))
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, int(config["hidden_size"])))]),
        params=ParamSchema(
            [ParamSpec("prompt_name", "string", "document"), ParamSpec("instruction", "string", "")]
        ),
    )
    requirements = [
        f"sentence-transformers=={version('sentence-transformers')}",
        f"transformers=={version('transformers')}",
        f"torch=={version('torch').split('+')[0]}",
    ]
    if (st_folder / "adapter").is_dir():
        requirements.append(f"peft=={version('peft')}")
    mlflow.sentence_transformers.save_model(
        _Folder(st_folder, copy), str(into), signature=signature, pip_requirements=requirements
    )
    return into


class _Folder:
    """What ``mlflow.sentence_transformers.save_model`` uses of a model: ``save`` (here: move or
    copy a folder already written) and ``modules`` (none it could describe)."""

    def __init__(self, folder: Path, copy: bool):
        self.folder, self.copy = folder, copy

    def save(self, path: str) -> None:
        if self.copy:  # hard links where the file system allows: no second copy of the weights
            shutil.copytree(self.folder, path, copy_function=_link_or_copy)
        else:
            shutil.move(str(self.folder), path)

    def modules(self) -> list[Any]:
        return []


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def log_mlflow_model(client: Any, run_id: str, folder: Path, name: str = NAME) -> str:
    """Log the MLflow model ``folder`` as a logged model of ``run_id`` (its output at step 0);
    return the model id (its URI is ``models:/<id>``)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, tags={"mlflow.modelFlavor": FLAVOR}
    )
    mlmodel = Model.load(str(folder / "MLmodel"))
    mlmodel.model_id = mlmodel.model_uuid = logged.model_id
    mlmodel.run_id = run_id
    mlmodel.artifact_path = logged.artifact_location
    mlmodel.save(str(folder / "MLmodel"))
    try:
        client.log_model_artifacts(logged.model_id, str(folder))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def register_model(client: Any, name: str, model_id: str, run_id: str) -> str:
    """A new version of registered model ``name`` (created if missing) from a logged model;
    return the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # the model's own location, not models:/<id>: MLflow's registry store would resolve that
    # through the process-wide tracking URI rather than this client's
    location = client.get_logged_model(model_id).artifact_location
    created = client.create_model_version(name, source=location, run_id=run_id, model_id=model_id)
    return str(created.version)
