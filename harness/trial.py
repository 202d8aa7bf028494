"""One trial of a sweep, as a Ray Tune function trainable.

A trial receives its grid cell (or Optuna sample) as the Tune config and the base experiment plus
the shared corpus through ``tune.with_parameters`` (so the corpus sits once in Ray's object store
and no trial reads or builds it). It trains, scores, and reports everything through
``tune.report``: one result per logged training step (so MLflow shows curves while the sweep runs)
and a final result with the scores, the tags and a tar of the artifacts. The driver turns those
results into MLflow calls; a trial never writes to the tracking store and needs no shared disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import socket
import sys
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import checkpoints
from harness.checkpoints import Checkpointing
from harness.config import Experiment, path_part, trial_key
from harness.experiment_file import apply_cell, cell_label
from harness.init_adapter import AdapterFiles
from harness.tracking import LEVEL_ORDER, MODEL_PATH, TRIAL_KEY, WORKER_NODES
from harness.untrained import untrained_scores, wanted
from synth.corpus import Corpus

if TYPE_CHECKING:  # torch is imported by the trial function, never here
    from harness.distributed import DataParallel

# Reserved result keys (everything else in a result is a metric).
KIND = "harness/kind"  # "step" (a training step), "note" (a progress line) or "final"
STEP = "harness/step"
NOTE = "harness/note"  # the text of a "note" report
# a "checkpoint" report carries the training state (bytes, harness/checkpoints.py), which the
# Tune trial turns into a Tune checkpoint; a "resume" report says the trial resumed after STEP and
# carries the checkpoint's STREAM (the metrics of steps 0 to STEP), for the driver to find or
# complete the run they belong to
CHECKPOINT = "harness/checkpoint"
STREAM = "harness/stream"
TAGS = "harness/tags"
ARTIFACTS = "harness/artifacts"  # tar bytes, popped by the driver before Ray stores the result
INLINE_ARTIFACT_LIMIT = 256 * 2**20  # bigger artifacts stay on the worker; a tag says where


@dataclass(frozen=True)
class TrialSpec:
    """One trial's identity, computed the same way on the driver and in the trial."""

    cell: dict[str, Any]
    exp: Experiment
    label: str
    key: str


def trial_spec(base: Experiment, cell: Mapping[str, Any], corpus_sha256: str) -> TrialSpec:
    exp = apply_cell(base, cell)
    return TrialSpec(dict(cell), exp, cell_label(cell), trial_key(exp, corpus_sha256))


def cell_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """The cell inside a Tune config: grid sweeps pass ``{"cell": {...}}``, Optuna a flat sample."""
    return dict(config["cell"]) if "cell" in config else dict(config)


@dataclass
class TrialContext:
    """What a trial function gets besides the experiment and the corpus."""

    label: str
    key: str
    workdir: Path  # this trial's folder on the node it runs on
    report: Callable[[int, Mapping[str, float]], None]  # stream metrics of one training step
    say: Callable[[str], None] = print  # a progress line for the driver to print (evaluation)
    # use a finished training an earlier attempt of this trial left in ``workdir`` (it failed
    # later, e.g. in evaluation) instead of training again; off for `harness sweep --no-resume`
    reuse_training: bool = True
    # this worker's place when the trial runs on several workers (resources.workers_per_trial);
    # only rank 0's output and reports are used
    parallel: DataParallel | None = None
    # train.checkpoint_every: where the training saves its state, and the state to resume from
    checkpointing: Checkpointing | None = None
    # where the untrained model's scores are cached per arm on this node (harness/untrained.py)
    untrained_cache: Path | None = None

    @property
    def leader(self) -> bool:
        return self.parallel is None or self.parallel.rank == 0


@dataclass
class TrialOutput:
    metrics: dict[str, float]  # final scores: heldout/*, eval/*
    artifacts: dict[str, Path] = field(default_factory=dict)  # artifact folder -> local file/folder
    tags: dict[str, str] = field(default_factory=dict)


TrialFn = Callable[[Experiment, Corpus, TrialContext], TrialOutput]


# In a trial's folder once its training finished: the model's place, its held-out scores, level
# order and metric stream. A later attempt of the same trial (same key, same node) that finds it
# evaluates that model instead of training again.
TRAINED_FILE = "trained.json"
# In a trial's folder while it trains with train.checkpoint_every: its last checkpoint, which a
# later sweep of the same trial on the same node resumes from (a retry gets Tune's).
CHECKPOINT_DIR = "checkpoint"
# Under the models folder of a node: the untrained scores of each arm (harness/untrained.py).
UNTRAINED_DIR = "_untrained"


@dataclass(frozen=True)
class Trained:
    model_dir: Path
    heldout: dict[str, float]
    level_order: list[int | str]
    reused: bool
    embedder: Any = None  # the trained model in memory (None: reused, load it from model_dir)


def train_or_reuse(exp: Experiment, corpus: Corpus, ctx: TrialContext, name: str) -> Trained:
    """Train the trial, or take the finished training of an earlier attempt (its metric stream is
    replayed, so the new run has the whole loss curve)."""
    from harness.train import train_one

    marker = ctx.workdir / TRAINED_FILE
    saved = None
    if ctx.leader and ctx.reuse_training and marker.is_file():
        saved = _finished_training(marker, ctx.say)
    if ctx.parallel is not None:  # the other workers train only if rank 0 does
        saved = ctx.parallel.from_first(saved)
    if saved is not None:
        for step, metrics in saved["stream"]:
            ctx.report(step, metrics)
        return Trained(Path(saved["model_dir"]), saved["heldout"], saved["level_order"], True)
    if ctx.leader:
        marker.unlink(missing_ok=True)
    untrained = None
    if ctx.leader and wanted(exp):
        untrained = partial(
            untrained_scores,
            exp,
            corpus_sha256=corpus.sha256,
            cache_dir=ctx.untrained_cache,
            on_task=ctx.say,
        )
    result = train_one(
        exp,
        corpus,
        output_dir=ctx.workdir,
        on_metrics=ctx.report,
        progress=False,
        name=name,
        parallel=ctx.parallel,
        checkpointing=ctx.checkpointing,
        untrained=untrained,
    )
    if not ctx.leader:
        return Trained(Path(result.model_dir), {}, result.level_order, reused=False)
    saved = {
        "model_dir": str(Path(result.model_dir).resolve()),
        # the saved model's description, which records its files' hashes: reuse checks both
        MODEL_SHA256: _meta_sha256(Path(result.model_dir)),
        "heldout": result.heldout,
        "level_order": result.level_order,
        "stream": result.stream,
    }
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved), encoding="utf-8")
    os.replace(tmp, marker)  # written last and whole: its presence means the training finished
    checkpoints.discard(ctx.workdir / CHECKPOINT_DIR)  # the finished training supersedes it
    return Trained(
        Path(result.model_dir), result.heldout, result.level_order, False, result.embedder
    )


MODEL_SHA256 = "embedder_json_sha256"  # in trained.json


def _meta_sha256(model_dir: Path) -> str:
    from harness.embedder import META_FILE

    return hashlib.sha256((model_dir / META_FILE).read_bytes()).hexdigest()


def _finished_training(marker: Path, say: Callable[[str], None]) -> dict[str, Any] | None:
    """The finished training that ``marker`` (trained.json) describes, if its model is whole: the
    ``embedder.json`` it recorded, whose file hashes and finite weights :func:`check_saved`
    checks. None (train again: the trial's folder is its own) otherwise, with a line saying why."""
    from harness.embedder import SavedModelError, check_saved

    try:
        saved = json.loads(marker.read_text(encoding="utf-8"))
        model_dir = Path(saved["model_dir"])
        if not (
            isinstance(saved["stream"], list)
            and isinstance(saved["heldout"], dict)
            and isinstance(saved["level_order"], list)
        ):
            raise ValueError("not the record of a finished training")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        say(f"{marker}: unreadable ({type(e).__name__}: {e}); training again")
        return None
    try:
        check_saved(model_dir)
        recorded, found = saved.get(MODEL_SHA256), _meta_sha256(model_dir)
        if recorded is not None and recorded != found:
            raise SavedModelError(
                f"{model_dir}: embedder.json sha256 {found[:12]}… is not the {recorded[:12]}… "
                f"recorded in {marker.name}"
            )
    except (SavedModelError, FileNotFoundError) as e:
        say(f"the finished training in {marker.parent} is not usable ({e}); training again")
        return None
    return saved


def train_and_evaluate(exp: Experiment, corpus: Corpus, ctx: TrialContext) -> TrialOutput:
    """The real trial: LoRA training with a held-out score (or an earlier attempt's finished
    training), then the mteb suite."""
    name = (
        f"{exp.name}/{ctx.label}-{ctx.key}"  # unique per trial: mteb caches results by model name
    )
    result = train_or_reuse(exp, corpus, ctx, name)
    if not ctx.leader:  # rank 0 scores, evaluates and reports
        return TrialOutput(metrics={})
    out = TrialOutput(
        metrics=dict(result.heldout),
        artifacts={"model": Path(result.model_dir)},
        tags={LEVEL_ORDER: ",".join(str(level) for level in result.level_order)},
    )
    if result.reused:
        out.tags["harness.reused_training"] = str(ctx.workdir / TRAINED_FILE)
    if exp.eval.enabled:
        from harness.embedder import Embedder
        from harness.evaluation.run import evaluate_embedder

        # the model just trained, as it is in memory (it was also saved); a reused one is loaded
        embedder = result.embedder or Embedder.load(result.model_dir)
        # The driver prints the trial's progress; a worker's own lines would interleave with it.
        evaluated = evaluate_embedder(
            embedder,
            exp.eval,
            output_dir=ctx.workdir / "mteb",
            name=name,
            progress=False,
            on_task=ctx.say,
        )
        out.metrics.update(
            {k if k.startswith("eval/") else f"eval/{k}": v for k, v in evaluated.metrics.items()}
        )
        out.artifacts["mteb"] = Path(evaluated.result_dir)
    if exp.tracking.log_model:  # a registrable MLflow model, which the driver logs
        from harness.export import export_mlflow_model
        from harness.mlflow_model import NAME

        target = ctx.workdir / NAME
        shutil.rmtree(target, ignore_errors=True)  # an earlier attempt's
        out.artifacts[NAME] = export_mlflow_model(
            result.model_dir, target, metrics=out.metrics, tags={TRIAL_KEY: ctx.key}
        )
    return out


def run_trial(
    config: dict[str, Any],
    *,
    base: Experiment,
    corpus: Corpus,
    models_dir: str,
    trial_fn: TrialFn | None = None,
    init_adapter: AdapterFiles | None = None,
    reuse_training: bool = True,
) -> None:
    """The Tune trainable (bind the keywords with ``tune.with_parameters``): the trial here, or on
    ``resources.workers_per_trial`` Ray Train workers (``harness/trial_parallel.py``)."""
    from ray import tune

    from harness.logs import quiet_logs

    quiet_logs()  # the driver's --verbose choice, passed down in the environment

    spec = trial_spec(base, cell_of(config), corpus.sha256)
    resume = None
    checkpoint = tune.get_checkpoint()  # a retry of this trial (resources.max_failures)
    if checkpoint is not None and spec.exp.train.checkpoint_every:
        with checkpoint.as_directory() as folder:
            resume = checkpoints.read(Path(folder))
    run = partial(
        run_spec,
        spec=spec,
        corpus=corpus,
        models_dir=models_dir,
        trial_fn=trial_fn,
        init_adapter=init_adapter,
        reuse_training=reuse_training,
        resume=resume,
    )
    if spec.exp.resources.workers_per_trial > 1:
        from harness.trial_parallel import run_workers

        run_workers(spec.exp.resources, run)
    else:
        run(send=report_to_tune)


def report_to_tune(result: dict[str, Any]) -> None:
    """``tune.report`` a trial's result; a "checkpoint" result's state becomes a Tune checkpoint
    (copied into the sweep's storage path, which keeps the last ``train.keep_checkpoints``)."""
    import tempfile

    from ray import tune

    state = result.pop(CHECKPOINT, None)
    if state is None:
        tune.report(result)
        return
    with tempfile.TemporaryDirectory(prefix="harness-checkpoint-") as tmp:
        folder = checkpoints.write(state, Path(tmp) / "state")
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(folder)))


def run_spec(
    *,
    send: Callable[[dict[str, Any]], None],
    spec: TrialSpec,
    corpus: Corpus,
    models_dir: str,
    trial_fn: TrialFn | None = None,
    init_adapter: AdapterFiles | None = None,
    reuse_training: bool = True,
    parallel: DataParallel | None = None,
    resume: bytes | None = None,
) -> None:
    """Run one trial (or this worker's part of it) and ``send`` its results: every step, every
    progress line, every checkpoint and the final scores, tags and artifacts. Only rank 0 sends
    anything. ``resume``: a checkpoint of this trial to continue from (a Tune retry's)."""
    leader = parallel is None or parallel.rank == 0
    # where each worker runs: exchanged first, while every worker is there (after training the
    # others wait for no one)
    nodes = parallel.all_objects(_node_id()) if parallel is not None else None
    workdir = Path(models_dir) / path_part(spec.exp.name) / path_part(f"{spec.label}-{spec.key}")
    workdir.mkdir(parents=True, exist_ok=True)
    if init_adapter is not None:  # shipped by the driver: this node may not see the driver's disk
        # one copy per worker: workers on one node share the trial's folder
        folder = "init_adapter" if parallel is None else f"init_adapter-{parallel.rank}"
        spec.exp.model.init_adapter = str(init_adapter.write(workdir / folder))
    sample = _system_sampler() if spec.exp.tracking.system_metrics else dict
    if not leader:
        send = _ignore

    def report(step: int, metrics: Mapping[str, float]) -> None:
        send({KIND: "step", STEP: int(step), **metrics, **sample()})

    def say(line: str) -> None:
        send({KIND: "note", NOTE: line})

    checkpointing = None
    if every := spec.exp.train.checkpoint_every:
        checkpointing = _checkpointing(every, workdir, send, resume, reuse_training, parallel)
    started = time.time()
    output = (trial_fn or train_and_evaluate)(
        spec.exp,
        corpus,
        TrialContext(
            spec.label,
            spec.key,
            workdir,
            report,
            say,
            reuse_training,
            parallel=parallel,
            checkpointing=checkpointing,
            untrained_cache=Path(models_dir) / UNTRAINED_DIR,
        ),
    )
    ended = time.time()
    if not leader:
        return
    broken = sorted(k for k, v in output.metrics.items() if not math.isfinite(float(v)))
    if broken:  # a FINISHED run must carry real numbers only
        raise FloatingPointError(f"the trial's scores are not finite: {', '.join(broken)}")
    bundle, left_out = pack_artifacts(output.artifacts, INLINE_ARTIFACT_LIMIT)
    host = socket.gethostname()
    tags = {
        **output.tags,
        **{
            f"{name}_dir": f"{host}:{path}"
            for name, path in output.artifacts.items()
            if name in left_out
        },
        **(
            {MODEL_PATH: f"{host}:{Path(output.artifacts['model']).resolve()}"}
            if "model" in output.artifacts
            else {}
        ),
        "harness.host": host,
        "harness.node_id": _node_id(),
        **({WORKER_NODES: ",".join(nodes)} if nodes else {}),
        # when the trial ran, as measured on its node (a tag: a time is not a metric to plot)
        "harness.started_at": _iso(started),
        "harness.ended_at": _iso(ended),
    }
    send(
        {
            KIND: "final",
            **output.metrics,
            "trial/seconds": ended - started,
            TAGS: tags,
            ARTIFACTS: bundle,
        }
    )


def _checkpointing(
    every: int,
    workdir: Path,
    send: Callable[[dict[str, Any]], None],
    resume: bytes | None,
    reuse_training: bool,
    parallel: DataParallel | None,
) -> Checkpointing:
    """This trial's checkpoints, every ``every`` steps: kept in its folder (for a later sweep on
    this node) and sent for Tune to keep (for a retry anywhere); resumed from ``resume`` (Tune's)
    or else that folder."""
    leader = parallel is None or parallel.rank == 0
    local = workdir / CHECKPOINT_DIR
    if resume is None and reuse_training:  # (the same on every worker: Tune gave all or none)
        found = checkpoints.read(local) if leader else None
        # every worker resumes from rank 0's state (its node has the trial's folder)
        resume = parallel.from_first(found) if parallel is not None else found
    state = checkpoints.from_bytes(resume) if resume is not None else None
    if state is not None:
        send({KIND: "resume", STEP: state.step, STREAM: state.stream})

    def save(state: checkpoints.TrainState) -> None:
        data = checkpoints.to_bytes(state)
        checkpoints.write(data, local)
        send({KIND: "checkpoint", STEP: state.step, CHECKPOINT: data})

    return Checkpointing(every, save, state)


def _ignore(result: dict[str, Any]) -> None:
    """Where the results of a worker other than rank 0 go."""


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def pack_artifacts(artifacts: Mapping[str, Path], limit: int) -> tuple[bytes, set[str]]:
    """A tar of the artifacts that fit in ``limit`` bytes (smallest first) and the names left out."""
    sizes = {name: _size(Path(path)) for name, path in artifacts.items()}
    buffer = io.BytesIO()
    left_out: set[str] = set()
    total = 0
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in sorted(artifacts, key=sizes.__getitem__):
            if total + sizes[name] > limit:
                left_out.add(name)
                continue
            total += sizes[name]
            tar.add(str(artifacts[name]), arcname=name)
    return buffer.getvalue(), left_out


def unpack_artifacts(bundle: bytes, into: Path) -> list[Path]:
    """Extract a bundle made by :func:`pack_artifacts`; return the top-level entries."""
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r") as tar:
        tar.extractall(into, filter="data")
    return sorted(into.iterdir())


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _system_sampler() -> Callable[[], dict[str, float]]:
    """CPU, memory and (when torch uses CUDA) GPU memory of this trial, as ``system/*`` metrics.

    Not MLflow's system-metrics logging: that samples the machine of the process holding the run,
    here the driver, while a trial runs in a Ray worker, possibly on another node."""
    import psutil

    proc = psutil.Process()
    proc.cpu_percent()  # the first call only starts the measurement

    def sample() -> dict[str, float]:
        out = {
            "system/cpu_percent": proc.cpu_percent(),
            "system/memory_rss_gb": proc.memory_info().rss / 2**30,
            "system/node_memory_percent": psutil.virtual_memory().percent,
        }
        torch = sys.modules.get("torch")  # only when the trial uses torch; never import it here
        if torch is not None and torch.cuda.is_available():
            out["system/gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    return sample
