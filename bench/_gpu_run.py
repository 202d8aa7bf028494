"""How ``bench/gpu_check.py`` runs on a machine it gets once: sections with their own time budget
that record a failure instead of raising, out-of-memory detection and batch halving, peak memory.
"""

from __future__ import annotations

import gc
import resource
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.embedder import Embedder

# ---------------------------------------------------------------- memory


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
    )


def free_memory(embedders: Sequence[Embedder] = ()) -> None:
    """Drop gradients and captured attention, collect, and return cached CUDA blocks."""
    for emb in embedders:
        emb.zero_grad(set_to_none=True)
        if emb._capture is not None:
            emb._capture.received = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated since :func:`reset_peak`; on CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def fit_batch(
    run: Callable[[int], Any],
    start: int,
    notes: list[str],
    *,
    free: Callable[[], None],
    simulate_oom_above: int | None = None,
) -> tuple[int, Any]:
    """Run ``run(batch)`` from ``start``, halving the batch on out of memory; returns the batch
    that fit and what ``run`` returned. ``simulate_oom_above`` pretends larger batches do not fit
    (so the halving is exercised on CPU)."""
    batch = start
    while True:
        failed = None
        try:
            if simulate_oom_above is not None and batch > simulate_oom_above:
                raise torch.OutOfMemoryError(f"simulated: batch {batch} > {simulate_oom_above}")
            return batch, run(batch)
        except Exception as e:
            if not is_oom(e) or batch == 1:
                raise
            failed = "simulated" if str(e).startswith("simulated") else "CUDA"
        free()  # outside the except block: its traceback no longer holds the step's tensors
        notes.append(f"batch {batch}: out of memory ({failed}), halved to {batch // 2}")
        print(notes[-1], flush=True)
        batch //= 2


# ---------------------------------------------------------------- budgets


@dataclass
class Section:
    """One part of the check: its own time budget, status, notes, skips and figures."""

    key: str
    title: str
    budget_s: float
    # ran; partial (something skipped for time); problem (a check did not hold); failed; not run
    status: str = "not run"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # checks that did not hold
    error: str | None = None
    error_detail: str | None = None  # the traceback's end
    data: dict[str, Any] = field(default_factory=dict)
    _started: float = 0.0

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self._started)

    def afford(self, seconds: float, what: str) -> bool:
        """Whether ``seconds`` more fit the budget; if not, ``what`` is recorded as skipped."""
        if seconds <= self.left():
            return True
        if not any(s.startswith(what) for s in self.skipped):  # once, also after a retry
            left = max(0.0, self.left())
            self.skipped.append(f"{what} (needs ~{seconds:.0f} s, {left:.0f} s left)")
            print(f"[{self.key}] skipped: {self.skipped[-1]}", flush=True)
        return False

    def run(self, fn: Callable[[Section], None]) -> None:
        """Run ``fn(self)``; a failure is recorded, not raised (the other sections still run)."""
        self._started = time.perf_counter()
        print(f"[{self.key}] {self.title} (budget {self.budget_s:.0f} s)", flush=True)
        try:
            fn(self)
            self.status = "problem" if self.problems else "partial" if self.skipped else "ran"
        except Exception as e:
            self.status = "failed"
            self.error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            self.error_detail = traceback.format_exc()[-4000:]
            traceback.print_exc()
        self.seconds = time.perf_counter() - self._started
        print(f"[{self.key}] {self.status} in {self.seconds:.0f} s", flush=True)

    def summary(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                *("title", "budget_s", "status", "seconds", "notes", "skipped", "problems"),
                *("error", "error_detail", "data"),
            )
        }
