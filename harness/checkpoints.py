"""Checkpoints inside a trial: the training state every ``train.checkpoint_every`` steps, so a trial
that loses its worker (a preempted node, a neighbour's OOM, a SIGKILL) resumes where it stopped
instead of at step 0.

A checkpoint is one file, ``state.pt``: the trainable (LoRA) weights, AdamW's and the LR
scheduler's state, every RNG's state, the step it was taken after (the schedule is a pure function
of the settings, so the step is the position in the stream), and the metrics reported so far. It
holds tensors, numbers and strings only, so it loads with ``torch.load(weights_only=True)``.

The training loop (``harness/train.py``) makes and restores it; where it is kept is the caller's:
for a sweep, the trial's folder and a Ray Tune checkpoint in the run's storage path (kept to the
last ``train.keep_checkpoints``; ``harness/trial.py``).
"""

from __future__ import annotations

import io
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the sweep's driver imports this module through trial.py: no torch there
    import torch

STATE_FILE = "state.pt"
Stream = list[tuple[int, dict[str, float]]]  # (step, metrics) as reported, in order


@dataclass
class TrainState:
    """Everything the training loop needs to continue after ``step`` as if it had not stopped."""

    step: int  # optimizer steps taken
    weights: dict[str, torch.Tensor]  # trainable parameters by name
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    stream: Stream = field(default_factory=list)  # the metrics reported up to ``step``
    heldout_before: dict[str, float] = field(default_factory=dict)


@dataclass
class Checkpointing:
    """Where :func:`harness.train.train_one` checkpoints and what it resumes from."""

    every: int  # take a checkpoint after every ``every`` steps (not after the last)
    save: Callable[[TrainState], None]  # keep it (only the first worker's is called)
    resume: TrainState | None = None


def capture_rng(device: torch.device) -> dict[str, Any]:
    """The state of every generator training draws from: torch (CPU and the CUDA device: dropout),
    Python's and NumPy's (seeded by ``transformers.set_seed``)."""
    import numpy as np
    import torch

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def to_bytes(state: TrainState) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(asdict(state), buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> TrainState:
    import torch

    raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    raw["stream"] = [(int(step), dict(metrics)) for step, metrics in raw["stream"]]
    return TrainState(**raw)


def write(data: bytes, folder: Path) -> Path:
    """Put a checkpoint (:func:`to_bytes`) in ``folder``, replacing the one there as a whole: a
    kill while writing leaves the previous checkpoint, never half of one."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / STATE_FILE).write_bytes(data)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read(folder: Path) -> bytes | None:
    """The checkpoint in ``folder`` (or the one a kill during :func:`write` left aside), if any."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return (candidate / STATE_FILE).read_bytes()
    return None


def discard(folder: Path) -> None:
    """Remove the checkpoint in ``folder`` (the training it belongs to finished)."""
    folder = Path(folder)
    for suffix in ("", ".partial", ".old"):
        shutil.rmtree(folder.with_name(folder.name + suffix), ignore_errors=True)
