"""Where a small pooling trial's time goes, before and after issue 29, and the peak memory of the
sweep driver and of a trial worker; both checkouts on the same machine in one run.

Each variant runs the real ``harness sweep`` of its own ``experiments/small/pooling.yaml`` (ATA,
``--seeds`` seeds one after the other, ``--steps`` steps, no MNTP adapter, the smoke corpus, a
fresh store) as a subprocess: "before" from a git worktree of ``--before`` (default: main as
issue 29 found it), "after" from this checkout. The phases come from the timestamps MLflow keeps
of each trial's metrics: setup and untrained scoring (run start to the first training step, less
one step), training (first to last step, plus one step), held-out scoring (last step to the
held-out metric) and evaluation (to the run's end: the trained model's evaluation, in "before"
with its save and reload). A second seed of the same arm shows the untrained scores cached per
arm. Memory: the peak resident set of the driver process and of any Ray trial worker
(``ray::`` processes), sampled every 0.5 s over the process tree.

    python bench/trial_split.py --steps 12 --seeds 2
"""

from __future__ import annotations

# _common first: importing it sets the offline environment (HF_HUB_OFFLINE, ...)
from _common import REPO, Report, parse, parser

# isort: split
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from mlflow import MlflowClient

NAME = "trial_split"
QUICK = {"steps": 2, "seeds": 1}
BEFORE = "2e7924a"  # main when issue 29 was filed
SWEEP = "import sys; from harness.cli import app; sys.argv[0] = 'harness'; app()"


class Peaks:
    """Peak RSS of a process (the driver) and of its ``ray::`` descendants (trial workers)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.driver = self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.root.memory_info().rss)
                for child in self.root.children(recursive=True):
                    try:
                        if "ray::" in " ".join(child.cmdline()):
                            self.worker = max(self.worker, child.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_variant(checkout: Path, work: Path, steps: int, seeds: int) -> tuple[list[dict], Peaks]:
    """The variant's sweep in ``work``; a sweep that finished there before is read, not rerun."""
    store = work / "mlflow.db"
    done = work / "finished.json"
    if done.is_file():
        peaks = Peaks.__new__(Peaks)
        peaks.driver, peaks.worker = json.loads(done.read_text())
        return phases(f"sqlite:///{store}", steps, _experiment_name(checkout)), peaks
    shutil.rmtree(work, ignore_errors=True)  # an unfinished attempt of this script's
    work.mkdir(parents=True)
    corpus = REPO / "results" / "corpora" / "smoke"
    sets = [
        "grid.pooling=[ata]", f"grid.seed={list(range(1, seeds + 1))}", f"train.steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}", "model.init_adapter=null",
        f"corpus.path={corpus}", f"tracking.uri=sqlite:///{store}",
        "resources.max_concurrent_trials=1", "tracking.system_metrics=false",
    ]  # fmt: skip
    args = [sys.executable, "-c", SWEEP, "sweep", str(checkout / "experiments/small/pooling.yaml")]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(checkout), "RAY_USAGE_STATS_ENABLED": "0"}
    with open(work / "sweep.log", "wb") as log:
        proc = subprocess.Popen(args, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        peaks = Peaks(proc.pid)
        code = proc.wait()
        peaks.stop()
    if code != 0:
        tail = (work / "sweep.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{checkout}: sweep failed ({code}):\n{tail}")
    done.write_text(json.dumps([peaks.driver, peaks.worker]))
    return phases(f"sqlite:///{store}", steps, _experiment_name(checkout)), peaks


def _experiment_name(checkout: Path) -> str:
    """The ``name:`` of the checkout's own pooling file (small-pooling before round 2, then
    small-r2-pooling), read without importing that checkout's code."""
    for line in (checkout / "experiments/small/pooling.yaml").read_text().splitlines():
        if line.startswith("name:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{checkout}: experiments/small/pooling.yaml has no name")


def phases(uri: str, steps: int, name: str) -> list[dict]:
    client = MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == name]
    runs = client.search_runs([exp.experiment_id], "tags.`harness.role` = 'trial'")
    out = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        loss = sorted(
            client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step
        )
        (held,) = client.get_metric_history(run.info.run_id, "heldout/recall_at_1")
        first, last = loss[0].timestamp, loss[-1].timestamp
        step = (last - first) / max(1, loss[-1].step - loss[0].step)
        start, end = run.info.start_time, run.info.end_time
        out.append(
            {
                "trial": run.info.run_name,
                "setup + untrained": (first - step - start) / 1000,
                "training": (last - first + step) / 1000,
                "held-out": (held.timestamp - last) / 1000,
                "evaluation": (end - held.timestamp) / 1000,
                "total": (end - start) / 1000,
                "step": step / 1000,
                "tasks": sum(k.startswith("eval/") for k in run.data.metrics) - 1,
            }
        )
    return out


def share(trial: dict, training: float) -> str:
    """The non-training share of ``trial`` if its training took ``training`` seconds."""
    fixed = trial["total"] - trial["training"]
    return f"{fixed / (fixed + training):.0%}"


def main() -> None:
    ap = parser(__doc__, NAME)
    ap.add_argument("--before", default=BEFORE, help="the revision measured as 'before'")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument(
        "--work", type=Path, default=None,
        help="keep the runs here; a rerun reads the variants that finished instead of rerunning them",
    )  # fmt: skip
    args = parse(ap, QUICK)
    work = args.work or Path(tempfile.mkdtemp(prefix="nm-trial-split-"))
    work.mkdir(parents=True, exist_ok=True)
    old = work / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=True)
    if not old.exists():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.before],
            check=True, capture_output=True,
        )  # fmt: skip
    try:
        results = {}
        for name, checkout in (("before", old), ("after", REPO)):
            print(f"{name}: {checkout}", flush=True)
            results[name] = run_variant(checkout, work / f"{name}-run", args.steps, args.seeds)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)])
    report = Report(f"Trial time split and peak memory, before ({args.before}) and after")
    report.para(
        f"`experiments/small/pooling.yaml` of each checkout, ATA, {args.seeds} seed(s) one after "
        f"the other, {args.steps} steps, no MNTP adapter, the smoke corpus. Seconds per phase "
        "from MLflow's metric timestamps; non-training = everything but training."
    )
    cols = ["setup + untrained", "training", "held-out", "evaluation", "total"]
    rows = []
    for name, (trials, _) in results.items():
        for t in trials:
            rows.append([name, t["trial"], t["tasks"], *(f"{t[c]:.0f}" for c in cols),
                         f"{1 - t['training'] / t['total']:.0%}", f"{t['step']:.1f}"])  # fmt: skip
    report.table(["variant", "trial", "eval metrics", *cols, "non-training", "s/step"], rows)
    report.table(
        ["variant", "driver peak RSS (GB)", "trial worker peak RSS (GB)"],
        [
            [n, f"{p.driver / 2**30:.2f}", f"{p.worker / 2**30:.2f}"]
            for n, (_, p) in results.items()
        ],
    )
    for name, (trials, _) in results.items():
        at60 = 60 * trials[0]["step"]

        cached = share(trials[-1], at60) if len(trials) > 1 else "not measured (one seed)"
        report.para(
            f"{name}, projected to the 60-step small trial (same per-step time, same fixed cost): "
            f"non-training {share(trials[0], at60)} for the first seed of the arm; {cached} for a later "
            "seed (untrained scores cached)."
        )
    report.write(args.out)


if __name__ == "__main__":
    main()
