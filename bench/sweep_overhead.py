"""Sweep overhead: wall time of a real `harness sweep` against the sum of trial times / concurrency.

Runs the real sweep path (``harness.sweep.run_sweep``: corpus load and hash check, MLflow parent and
child runs in a throw-away SQLite store, a fresh local Ray instance, Ray Tune, the corpus handed to
every trial through Ray's object store, per-step reports streamed to the driver) over a grid of
``--trials`` seeds at ``--concurrency``, with a stand-in trial function (injected like the sweep
tests do) that loads the real model (packaged SmolLM2-135M + LoRA; ``--no-model`` skips it) and then
sleeps or computes until ``--duration`` seconds after it started, reporting a step every second.

Reported: wall time (the run_sweep call, Ray start and shutdown included), the ideal time (sum of
trial times / concurrency), efficiency = ideal / wall, and where the rest goes: the start-up (call
to first trial start: driver set-up, Ray start, Tune and actor start, corpus hand-over), the gaps
between one trial's end and the next trial's start, and the tail (last trial end to return). The
corpus hand-over is also measured alone afterwards (ray.put + a task reading it, in a second Ray
instance). From the fixed overhead, the efficiency at other trial durations is extrapolated.
Target (issue 7): efficiency at least 0.85 for trials of a minute or more.

    python bench/sweep_overhead.py --trials 4 --concurrency 2 --duration 60
"""

from __future__ import annotations

# _common first: importing it sets the offline environment (HF_HUB_OFFLINE, ...)
from _common import SMOLLM2, Report, corpus_path, parse, parser, verdict

# isort: split
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

NAME = "sweep_overhead"
QUICK = {"duration": 5.0}


def _epoch(iso: str | None) -> float | None:
    """A trial's ``harness.started_at`` / ``ended_at`` tag as seconds since the epoch."""
    return datetime.fromisoformat(iso).timestamp() if iso else None


def busy(seconds: float) -> None:
    """One thread of matrix products for ``seconds``."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    until = time.time() + seconds
    while time.time() < until:
        a = torch.tanh(a @ a)


def make_trial(duration: float, work: str, load_model: bool) -> Callable[..., Any]:
    """The stand-in trial: real model load, then sleep or compute until ``duration`` is up.

    Defined in ``__main__``, so Ray pickles it by value: workers need no extra import path.
    """

    def trial(exp: Any, corpus: Any, ctx: Any) -> Any:
        from harness.trial import TrialOutput

        start = time.time()
        load_s = report_s = 0.0
        if load_model:  # what a real trial pays first (torch and transformers imports included)
            tick = time.perf_counter()
            from harness.embedder import Embedder

            Embedder.from_settings(exp.model, "cpu", lora=True)
            load_s = time.perf_counter() - tick
        step = 0
        while (left := start + duration - time.time()) > 0:
            step += 1
            if work == "compute":
                busy(min(1.0, left))
            else:
                time.sleep(min(1.0, left))
            tick = time.perf_counter()
            ctx.report(step, {"train/loss": 1.0 / step, "train/examples_per_s": 1.0})
            report_s += time.perf_counter() - tick
        metrics = {"bench/load_s": load_s, "bench/report_s": report_s, "bench/steps": float(step)}
        return TrialOutput(metrics={**metrics, "bench/corpus_rows": float(len(corpus))})

    return trial


def experiment(args: Any, corpus: Path, scratch: Path) -> Path:
    cpus = min(1.0, (os.cpu_count() or 1) / args.concurrency)
    data = {
        "name": "bench-sweep-overhead",
        "corpus": {"path": str(corpus.resolve())},
        "model": {
            "name": SMOLLM2,
            "pooling": "mean",
            "dtype": "float32",
            "attn_implementation": "sdpa",
            "lora": {"r": 8, "alpha": 16},
        },
        "train": {"steps": 1, "batch_size": 8, "heldout_size": 0, "device": "cpu"},
        "grid": {"seed": list(range(1, args.trials + 1))},
        "eval": {"enabled": False},
        "resources": {
            "gpus_per_trial": 0,
            "cpus_per_trial": cpus,
            "max_concurrent_trials": args.concurrency,
            "reuse_workers": not args.no_reuse,
        },
        "tracking": {"uri": f"sqlite:///{scratch / 'mlflow.db'}"},
    }
    path = scratch / "sweep.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class RayClock:
    """Wraps ray.init / ray.shutdown while run_sweep runs, to time the Ray start and stop."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def wrap(self, ray: Any, name: str) -> Callable[..., Any]:
        original = getattr(ray, name)

        def timed(*a: Any, **kw: Any) -> Any:
            self.marks[name + "_start"] = time.time()
            try:
                return original(*a, **kw)
            finally:
                self.marks[name + "_end"] = time.time()

        setattr(ray, name, timed)
        return original

    def seconds(self, name: str) -> float:
        return self.marks.get(name + "_end", float("nan")) - self.marks.get(
            name + "_start", float("nan")
        )


def run(args: Any, corpus: Path, scratch: Path) -> dict[str, Any]:
    """One sweep; returns the time line of the driver and of every trial."""
    import ray

    from harness.experiment_file import load_experiment
    from harness.sweep import run_sweep
    from harness.tracking import Tracker

    path = experiment(args, corpus, scratch)
    # A user's store exists already: create this one first, untimed (migrations take seconds).
    tick = time.perf_counter()
    exp = load_experiment(path)
    Tracker(exp.tracking, exp.name)
    store_s = time.perf_counter() - tick
    clock = RayClock()
    originals = {name: clock.wrap(ray, name) for name in ("init", "shutdown")}
    trial_fn = make_trial(args.duration, args.work, not args.no_model)
    try:
        t0 = time.time()
        summary = run_sweep(
            path,
            address="local",
            resume=False,
            trial_fn=trial_fn,
            results_dir=scratch / "results",
            console=Console(stderr=True),
        )
        t1 = time.time()
    finally:
        for name, original in originals.items():
            setattr(ray, name, original)
    trials = [
        {
            "label": r.label,
            "status": r.status,
            "seconds": r.seconds,
            "start": _epoch(r.tags.get("harness.started_at")),
            "end": _epoch(r.tags.get("harness.ended_at")),
            "load_s": r.metrics.get("bench/load_s"),
            "report_s": r.metrics.get("bench/report_s", 0.0),
            "steps": r.metrics.get("bench/steps", 0.0),
        }
        for r in summary.records
    ]
    return {"t0": t0, "t1": t1, "clock": clock, "trials": trials, "store_s": store_s}


def hand_over(corpus: Path) -> dict[str, float]:
    """The corpus alone through Ray's object store, as ``tune.with_parameters`` ships it."""
    import ray

    from synth.corpus import read_corpus

    data = read_corpus(corpus)
    size = len(pickle.dumps(data))
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:

        @ray.remote
        def rows(c: Any) -> int:
            return len(c)

        tick = time.perf_counter()
        ref = ray.put(data)
        put_s = time.perf_counter() - tick
        tick = time.perf_counter()
        ray.get(rows.remote(ref))
        first_s = time.perf_counter() - tick
        tick = time.perf_counter()
        ray.get(rows.remote(ref))
        warm_s = time.perf_counter() - tick
    finally:
        ray.shutdown()
    return {
        "rows": float(len(data)),
        "bytes": float(size),
        "put_s": put_s,
        "first_s": first_s,
        "warm_s": warm_s,
    }


def gaps(trials: list[dict[str, Any]], concurrency: int) -> list[float]:
    """For every trial after the first ``concurrency``: its start minus the end of the trial whose
    slot it took (the earliest end not yet taken)."""
    starts = sorted(t["start"] for t in trials)
    ends = sorted(t["end"] for t in trials)
    return [s - e for s, e in zip(starts[concurrency:], ends)]


def main() -> None:
    ap = parser(__doc__, NAME)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument(
        "--duration", type=float, default=60.0, help="seconds per trial (model load included)"
    )
    ap.add_argument(
        "--work",
        choices=("sleep", "compute"),
        default="sleep",
        help="what a trial does after loading the model: sleep (pure overhead) or compute "
        "(1 thread)",
    )
    ap.add_argument("--no-model", action="store_true", help="trials skip the model load")
    ap.add_argument(
        "--no-reuse",
        action="store_true",
        help="a new Ray worker per trial (resources.reuse_workers: false) instead of reusing one",
    )
    ap.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="corpus folder (default: the smoke experiment's, mined on first use as "
        "`harness sweep experiments/smoke.yaml` does)",
    )
    args = parse(ap, QUICK)

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        scratch = Path(tmp)
        corpus = corpus_path(args.corpus)
        result = run(args, corpus, scratch)
        probe = hand_over(corpus)

    trials = [t for t in result["trials"] if t["status"] == "FINISHED" and t["start"] is not None]
    if len(trials) != args.trials:
        raise SystemExit(f"only {len(trials)} of {args.trials} trials finished: {result['trials']}")
    t0, t1, clock = result["t0"], result["t1"], result["clock"]
    wall = t1 - t0
    ideal = sum(t["seconds"] for t in trials) / min(args.concurrency, len(trials))
    efficiency = ideal / wall
    first = min(t["start"] for t in trials)
    last = max(t["end"] for t in trials)
    ray_up = clock.marks.get("init_end", first)
    slot_gaps = gaps(trials, args.concurrency)
    loads = [t["load_s"] for t in trials if t["load_s"]]
    overhead = wall - ideal  # fixed cost of this sweep shape, independent of trial duration
    mean_trial = sum(t["seconds"] for t in trials) / len(trials)

    report = Report(
        "Sweep overhead: harness sweep wall time vs sum of trial times / concurrency",
        libs=("ray", "mlflow"),
    )
    report.para(
        f"{args.trials} stand-in trials of {args.duration:g} s ({args.work} after "
        + ("no model load" if args.no_model else "loading the packaged SmolLM2-135M + LoRA")
        + f") at concurrency {args.concurrency}, through harness.sweep.run_sweep: local Ray, "
        f"Tune, MLflow SQLite store, corpus {corpus} ({probe['rows']:.0f} rows, "
        f"{probe['bytes'] / 1e6:.2f} MB pickled) handed over through Ray's object store."
    )
    report.table(
        ["measure", "seconds"],
        [
            ("wall time (run_sweep call to return)", f"{wall:.1f}"),
            (f"ideal: sum of trial times / {args.concurrency}", f"{ideal:.1f}"),
            ("**efficiency** (ideal / wall)", f"**{efficiency:.3f}**"),
            ("overhead (wall − ideal)", f"{overhead:.1f}"),
        ],
    )
    report.add("## Where the overhead goes", "")
    rows = [
        ("start-up: call to first trial start", f"{first - t0:.1f}"),
        (
            "  driver set-up before Ray (config, corpus hash, MLflow runs, plan)",
            f"{clock.marks.get('init_start', t0) - t0:.1f}",
        ),
        ("  Ray start (ray.init)", f"{clock.seconds('init'):.1f}"),
        (
            "  Ray up to first trial start (Tune, actor start, corpus hand-over)",
            f"{first - ray_up:.1f}",
        ),
        (
            "gaps between a trial's end and the next start in its slot (each)",
            ", ".join(f"{g:.1f}" for g in slot_gaps) or "–",
        ),
        ("tail: last trial end to return", f"{t1 - last:.1f}"),
        ("  of which Ray shutdown", f"{clock.seconds('shutdown'):.1f}"),
        (
            "model load inside each trial (mean; part of the trial times)",
            f"{sum(loads) / len(loads):.1f}" if loads else "–",
        ),
        (
            "not in the wall time: creating the MLflow store (once per store)",
            f"{result['store_s']:.1f}",
        ),
        (
            "step reports inside trials (tune.report; mean per report, part of the trial times)",
            f"{sum(t['report_s'] for t in trials) / max(1.0, sum(t['steps'] for t in trials)):.3f}",
        ),
        ("corpus hand-over alone: ray.put", f"{probe['put_s']:.3f}"),
        (
            "corpus hand-over alone: first task reading it (worker start included)",
            f"{probe['first_s']:.3f}",
        ),
        ("corpus hand-over alone: warm task reading it", f"{probe['warm_s']:.3f}"),
    ]
    report.table(["part", "seconds"], rows, "lr")
    trial_rows = [
        (t["label"], f"{t['start'] - t0:.1f}", f"{t['end'] - t0:.1f}", f"{t['seconds']:.1f}")
        for t in sorted(trials, key=lambda t: t["start"])
    ]
    report.add("Trials (times from the run_sweep call):", "")
    report.table(["trial", "start (s)", "end (s)", "trial time (s)"], trial_rows)
    n_rounds = args.trials / args.concurrency
    lines = []
    for d in (30, 60, 120, 300, 600):
        lines.append((f"{d} s", f"{n_rounds * d / (n_rounds * d + overhead):.3f}"))
    report.add(
        "Efficiency extrapolated to other trial durations (same shape, overhead held at "
        f"{overhead:.1f} s):",
        "",
    )
    report.table(["trial time", "efficiency"], lines)
    met = verdict(efficiency >= 0.85) if mean_trial >= 60 else "(not measured: trials under 60 s)"
    report.para(
        f"Target: efficiency at least 0.85 for trials of a minute or more: {met} "
        f"(measured {efficiency:.3f} with trials of {mean_trial:.0f} s; extrapolated to 60 s: "
        f"{n_rounds * 60 / (n_rounds * 60 + overhead):.3f})."
    )
    report.write(args.out)


if __name__ == "__main__":
    main()
