"""``harness export RUN_ID|MODEL_DIR --out DIR``: a trained model as a sentence-transformers folder.

``SentenceTransformer(DIR, trust_remote_code=True)`` loads it in one call and embeds as the harness
does (``harness/st_module.py`` says why a custom module, and ships in the folder). The folder:

- ``config.json``, ``model.safetensors``: the backbone, its init adapter (MNTP) merged in, the
  trained LoRA merged too with ``--merge`` (no peft needed, one set of weights), otherwise kept
  apart in ``adapter/`` (peft's format, the exact weights the harness trained);
- the tokenizer, ``harness_embedding.json`` (pooling, attention, input format, lengths) and the
  module's code: ``st_module.py``, ``inputs.py``, ``pooling.py``;
- ``modules.json`` and ``config_sentence_transformers.json``: the prompts (the template's opening
  with an instruction: ``query`` for retrieval, one per symmetric mteb task type, ``document``
  empty), cosine similarity, the versions it needs;
- ``README.md``: the model card (``harness/model_card.py``).

Nothing in it names a place on this machine: the base model goes by its Hub id, local paths in the
training configuration by their last part, and the export fails if a known local path is left.
With ``--log``, the folder is also logged to the run as an MLflow model (sentence-transformers
flavour) that can be registered (``--register NAME``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import torch

from harness.model_card import model_card
from synth import outputs, packaged

if TYPE_CHECKING:
    from harness.embedder import Embedder

COMMAND = "harness export"  # what synth.outputs.MARKER records in an exported folder
MODULE_TYPE = "st_module.HarnessEmbedding"  # the class in the folder's st_module.py
# the Hub checkpoints the packaged stand-ins come from (synth/packaged.py)
PACKAGED_HUB_IDS = {
    f"{packaged.PREFIX}{packaged.SMOLLM2}": "HuggingFaceTB/SmolLM2-135M-Instruct",
    f"{packaged.PREFIX}{packaged.MINILM}": "sentence-transformers/all-MiniLM-L6-v2",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# files that could name a local path (the tokenizer's vocabulary is the base model's, left alone)
CHECKED_SUFFIXES = (".json", ".md", ".yaml", ".txt")
UNCHECKED_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt")
_LOCAL_STORE = re.compile(r"^(sqlite|file):", re.IGNORECASE)


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why."""


@dataclass(frozen=True)
class Provenance:
    """Where a trained model came from, for its card: the run (if any) and the saved model."""

    meta: dict[str, Any]  # the saved model's embedder.json
    run_id: str | None = None
    run_name: str | None = None
    experiment: str | None = None
    config: dict[str, Any] | None = None  # the run's config.yaml, made portable
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    merged: bool
    prompts: dict[str, str]
    model_id: str | None = None  # the MLflow logged model (with ``log``)
    version: str | None = None  # its registered version (with ``register``)


def export_model(
    model_or_run: str,
    out: str | os.PathLike[str],
    *,
    merge: bool = False,
    instruction: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    tracking_uri: str | None = None,
    force: bool = False,
    log: bool = False,
    register: str | None = None,
) -> ExportResult:
    """Export a saved model (a folder from ``harness train``) or an MLflow trial run's model.

    Args:
        merge: merge the LoRA adapter into the weights (otherwise kept in ``adapter/``).
        instruction: the ``query`` prompt's instruction (default: a generic retrieval one).
        dtype: the weights' dtype (float32, bfloat16, float16; default: as the model loads).
        force: replace ``out`` when it is an earlier export (synth/outputs.py: never another
            folder, nor the model exported).
        log: also log the folder to the run as an MLflow model (a run id only).
        register: also register that MLflow model under this name (implies ``log``).
    """
    from harness.embedder import META_FILE, Embedder
    from harness.saved_models import RUN_ID, run_model

    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    log = log or register is not None
    is_run = bool(RUN_ID.match(model_or_run))
    if not is_run and not (Path(model_or_run) / META_FILE).is_file():
        raise ExportError(
            f"{model_or_run}: not a folder saved by `harness train` (no {META_FILE}) "
            "nor an MLflow run id (32 hex digits)"
        )
    # before anything loads; checked again against the run's model folder once it is found
    out = outputs.check_output(out, COMMAND, inputs=[] if is_run else [model_or_run], force=force)
    if log and not is_run:
        raise ExportError("--log and --register need an MLflow run id, not a folder")
    if is_run:
        found = run_model(model_or_run, tracking_uri)
        source, provenance = found.path, _run_provenance(found.path, model_or_run, tracking_uri)
        outputs.check_output(out, COMMAND, inputs=[source], force=force)
    else:
        source = Path(model_or_run)
        provenance = Provenance(meta=_read_meta(source))
    try:
        embedder = Embedder.load(source, device)
    finally:
        if is_run:
            found.discard()  # the downloaded copy: loaded, it is not read again
    with outputs.replacing(out, COMMAND, inputs=[source], force=force) as tmp:  # moved in whole
        prompts = write_export(
            embedder, tmp, merge=merge, instruction=instruction, dtype=dtype, provenance=provenance
        )
        check_portable(tmp, _local_paths(source, embedder))
    merged = not has_adapter(out)
    if not log:
        return ExportResult(out, merged, prompts)
    from harness.mlflow_model import log_mlflow_model, mlflow_model_folder, register_model
    from harness.saved_models import client_for

    client = client_for(tracking_uri)
    # beside the export, so that the MLflow folder can hard-link its files
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-mlflow.", dir=out.parent) as into:
        model_id = log_mlflow_model(
            client, model_or_run, mlflow_model_folder(out, Path(into) / "model", copy=True)
        )
    version = register_model(client, register, model_id, model_or_run) if register else None
    return ExportResult(out, merged, prompts, model_id, version)


def export_mlflow_model(
    model_dir: Path,
    into: Path,
    *,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    device: str | None = None,
) -> Path:
    """The saved model at ``model_dir`` as an MLflow model folder ``into`` (sentence-transformers
    flavour around an unmerged export; ``metrics`` and ``tags`` go into its card): what a run
    logs with ``tracking.log_model``."""
    from harness.embedder import Embedder
    from harness.mlflow_model import mlflow_model_folder

    embedder = Embedder.load(model_dir, device)
    provenance = Provenance(
        _read_meta(model_dir), metrics=dict(metrics or {}), tags=dict(tags or {})
    )
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{into.name}.", dir=into.parent))  # moved, not copied
    try:
        write_export(embedder, tmp / "st", provenance=provenance)
        check_portable(tmp / "st", _local_paths(model_dir, embedder))
        return mlflow_model_folder(tmp / "st", into)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_export(
    embedder: Embedder,
    out: Path,
    *,
    merge: bool = False,
    instruction: str | None = None,
    dtype: str | None = None,
    provenance: Provenance | None = None,
) -> dict[str, str]:
    """Write ``embedder`` as a sentence-transformers folder into ``out``; return its prompts.

    The embedder is consumed: merging changes its model in place."""
    import sentence_transformers
    import transformers

    from harness.st_module import HarnessEmbedding

    settings = embedder.settings
    model = embedder.model
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    base_model = portable_name(settings.name)
    module = HarnessEmbedding(
        model,
        embedder.tokenizer,
        pooling=settings.pooling,
        bidirectional=embedder.bidirectional,
        is_decoder=embedder.is_decoder,
        instructed=embedder.template.instructed,
        plain=embedder.template.plain,
        skip_instruction=settings.skip_instruction,
        padding_side=settings.padding_side,
        max_query_length=settings.max_query_length,
        max_doc_length=settings.max_doc_length,
        autocast=settings.autocast,
        attn_implementation=None
        if settings.attn_implementation == "auto"
        else settings.attn_implementation,
        base_model=base_model,
    )
    module.save(str(out))
    _portable_json(out / "config.json", base_model)
    query, symmetric = default_prompts()
    prompts = {
        "query": module.prompt_for(instruction or query),
        "document": "",
        **{kind: module.prompt_for(text) for kind, text in symmetric.items()},
    }
    requirements = {"sentence_transformers": ">=6.0", "transformers": ">=5.0"}
    if has_adapter(out):
        import peft

        # the adapter's config is this peft's; older releases may not read its fields
        requirements["peft"] = ">=" + ".".join(peft.__version__.split(".")[:2])
    _write_json(
        out / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "__version__": {
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            },
            "prompts": prompts,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            "requirements": requirements,
        },
    )
    _write_json(out / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": MODULE_TYPE}])
    provenance = provenance or Provenance(meta={})
    config = provenance.config or portable_config(
        {
            "model": settings.model_dump(mode="json"),
            **({"train": provenance.meta["train"]} if provenance.meta.get("train") else {}),
        }
    )
    card = model_card(
        base_model=base_model,
        settings=settings,
        provenance=provenance,
        config=config,
        prompts=prompts,
        merged=not has_adapter(out),
        bidirectional=embedder.bidirectional,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        dimension=module.get_embedding_dimension(),
        files=sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()),
    )
    (out / "README.md").write_text(card, encoding="utf-8")
    return prompts


# ---------------------------------------------------------------- portable references


def portable_name(name: str) -> str:
    """The base model as others can find it: a Hub id, the packaged model's origin on the Hub, or a
    local folder's name."""
    if name in PACKAGED_HUB_IDS:
        return PACKAGED_HUB_IDS[name]
    from harness.config import is_local_path

    return PurePath(os.path.expanduser(name)).name if is_local_path(name) else name


def portable_config(data: Any) -> Any:
    """A configuration with local paths replaced by ``<local>/<last part>`` (stores by
    ``<local store>``) and the base model by :func:`portable_name`."""
    if isinstance(data, dict):
        out = {k: portable_config(v) for k, v in data.items()}
        model = out.get("model")
        if isinstance(model, dict) and isinstance(model.get("name"), str):
            model["name"] = portable_name(data["model"]["name"])
        return out
    if isinstance(data, list):
        return [portable_config(v) for v in data]
    if isinstance(data, str):
        if _LOCAL_STORE.match(data):
            return "<local store>"
        if data.startswith(("/", "~", "./", "../")) or re.match(r"^[A-Za-z]:[\\/]", data):
            return f"<local>/{PurePath(data).name}"
    return data


def check_portable(folder: Path, local_paths: list[str]) -> None:
    """Fail if a text file of ``folder`` names one of ``local_paths``."""
    needles = sorted({p for p in local_paths if len(p) > 1}, key=len, reverse=True)
    for path in sorted(folder.rglob("*")):
        if path.suffix not in CHECKED_SUFFIXES or path.name in UNCHECKED_FILES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for needle in needles:
            if needle in text:
                raise ExportError(
                    f"{path.relative_to(folder)} names the local path {needle}: not exported"
                )


def _local_paths(source: Path, embedder: Embedder) -> list[str]:
    found = [str(Path.home()), str(Path.cwd()), str(source.resolve()), str(packaged.cache_dir())]
    base = getattr(_base_config(embedder.model), "_name_or_path", "")
    if base and Path(base).is_absolute():
        found.append(base)
    return [p for p in found if p not in ("/", "")]


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _portable_json(path: Path, base_model: str) -> None:
    """transformers may write the folder the weights came from into a config: name the base."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("_name_or_path", "name_or_path", "_model_name_or_path"):
        if isinstance(data.get(key), str) and portable_config(data[key]) != data[key]:
            data[key] = base_model
    _write_json(path, data)


def default_prompts() -> tuple[str, dict[str, str]]:
    """Instructions of ``harness/data/instructions.yaml``'s per-type lists: the one for retrieval
    queries, and one per mteb task type whose every text gets an instruction (symmetric)."""
    import yaml

    text = resources.files("harness").joinpath("data/instructions.yaml").read_text("utf-8")
    data = yaml.safe_load(text)
    kinds = {**data["fallback"], **data["types"]}
    asymmetric = ("Retrieval", "Reranking")  # their documents get no instruction
    return kinds["Retrieval"], {k: v for k, v in kinds.items() if k not in asymmetric}


# ---------------------------------------------------------------- provenance


def _read_meta(folder: Path) -> dict[str, Any]:
    from harness.embedder import check_saved

    return check_saved(folder)  # before anything is written: a damaged model is one line


def _run_provenance(folder: Path, run_id: str, tracking_uri: str | None) -> Provenance:
    import yaml

    from harness.saved_models import client_for

    client = client_for(tracking_uri)
    run = client.get_run(run_id)
    config = None
    if any(f.path == "config.yaml" for f in client.list_artifacts(run_id)):
        with tempfile.TemporaryDirectory(prefix="harness-export-") as tmp:
            text = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text("utf-8")
        config = portable_config(yaml.safe_load(text))
    experiment = client.get_experiment(run.info.experiment_id)
    return Provenance(
        meta=_read_meta(folder),
        run_id=run_id,
        run_name=run.info.run_name,
        experiment=experiment.name if experiment else None,
        config=config,
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
    )


def has_adapter(folder: Path) -> bool:
    """Whether an exported folder keeps its LoRA adapter apart (``adapter/``, needs peft)."""
    from harness.st_module import ADAPTER_DIR

    return (folder / ADAPTER_DIR).is_dir()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
