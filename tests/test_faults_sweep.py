"""The sweep under faults, on one real local Ray instance shared by the module and real SQLite
MLflow stores: trials that raise, run out of memory, die by SIGKILL or name a model that does not
exist are FAILED in MLflow with their error while the others finish, and ``harness tables`` marks
them; the sweep driver SIGKILLed at random moments loses no finished trial and repeats none; an API
key in the environment is written nowhere.

OPENAI_API_KEY holds a planted key for the whole module, set before Ray starts, so the driver and
every trial process have it, as they would on a researcher's machine. One sweep (its corpus built
by `synth generate` through a faulty endpoint that echoes the key, its trials failing in every way)
serves the failure, tables and secrets tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sweep_standins
from conftest import repeats
from fault_proxy import FaultPlan, fault_proxy
from faults_util import PLANTED_KEY, assert_secret_absent
from rich.console import Console
from sweep_util import runs, start_driver, write_experiment
from synth_servers import scripted, serve, synth_config_file
from typer.testing import CliRunner

from harness.cli import app
from harness.experiment_file import grid_cells, load_experiment
from harness.sweep import run_sweep
from harness.trial import trial_spec
from synth.corpus import read_manifest

pytestmark = pytest.mark.faults
runner = CliRunner()
NO_MODEL = "no-such-org/no-such-model-7b"
ENDPOINT_FAULTS = ["429", "500", "503", "500"]


@pytest.fixture(scope="module", autouse=True)
def planted_key() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", PLANTED_KEY)
        yield PLANTED_KEY


def run_tables(exp: Path, out: Path) -> tuple[str, str]:
    """``harness tables`` through its CLI: what it printed, and the Markdown table it wrote."""
    result = runner.invoke(app, ["tables", str(exp), "--output", str(out)])
    assert result.exit_code == 0, result.output
    return result.output, (out / "ablation.md").read_text(encoding="utf-8")


@dataclass(frozen=True)
class FaultySweep:
    tmp: Path
    exp: Path
    records: dict[str, Any]  # label -> TrialRecord
    injected: Counter[str]  # endpoint faults during the corpus build
    printed: list[str]  # the sweep's console, stdout, stderr and log records
    tables: str  # ``harness tables`` output
    tables_md: str


@pytest.fixture(scope="module")
def faulty_sweep(ray_instance: Any, tmp_path_factory: pytest.TempPathFactory) -> FaultySweep:
    """``sweep_standins.faulty`` over seeds 0-5 of an experiment naming a model that does not exist,
    its corpus built by the sweep (``corpus.build``) through a faulty endpoint; then
    ``harness tables``."""
    tmp = tmp_path_factory.mktemp("faulty")
    console, out, err, logs = io.StringIO(), io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger().addHandler(handler)
    try:
        with (
            serve(scripted()) as upstream,
            fault_proxy(upstream, FaultPlan(ENDPOINT_FAULTS)) as (url, log),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            synth_yaml = synth_config_file(
                tmp / "synth",
                endpoint={"base_url": url, "api_key_env": "OPENAI_API_KEY", "max_retries": 6},
            )
            corpus = tmp / "corpus"
            exp = write_experiment(
                tmp,
                corpus,
                "faulty",
                build_with=synth_yaml,
                model={"name": NO_MODEL},
                grid={"seed": list(range(6))},
                train={"steps": 3, "batch_size": 2, "heldout_size": 0},
            )
            summary = run_sweep(
                exp,
                [],
                trial_fn=sweep_standins.faulty,
                results_dir=tmp / "r",
                console=Console(file=console, width=200),
            )
    finally:
        logging.getLogger().removeHandler(handler)
    tables, md = run_tables(exp, tmp / "tables")
    return FaultySweep(
        tmp,
        exp,
        {r.label: r for r in summary.records},
        log.injected,
        [console.getvalue(), out.getvalue(), err.getvalue(), logs.getvalue()],
        tables,
        md,
    )


def test_failing_trials_are_failed_in_mlflow_with_their_error_and_the_others_finish(
    faulty_sweep: FaultySweep, tally: Any
) -> None:
    """The model id that does not exist fails in the real loader; the out-of-memory error is
    torch's CPU allocator refusing a batch far beyond the machine's memory (a real allocation
    failure, not a simulated exception); the SIGKILLed trial is what the kernel's OOM killer
    does."""
    records = faulty_sweep.records
    assert {label: r.status for label, r in records.items()} == {
        "s0": "FAILED",
        "s1": "FAILED",
        "s2": "FAILED",
        "s3": "FAILED",
        "s4": "FINISHED",
        "s5": "FINISHED",
    }
    trials = {r.info.run_name: r for r in runs(faulty_sweep.tmp, "faulty", "trial")}
    assert {name: run.info.status for name, run in trials.items()} == {
        k: r.status for k, r in records.items()
    }
    errors = {name: run.data.tags.get("harness.error", "") for name, run in trials.items()}
    assert errors["s0"].startswith(f"ModelLoadError: cannot load model '{NO_MODEL}'")
    assert errors["s1"] == "ValueError: trial raised on purpose"
    assert "can't allocate memory" in errors["s2"] and "DefaultCPUAllocator" in errors["s2"]
    assert errors["s3"].startswith("ActorDiedError") and "died" in errors["s3"]
    assert all(errors[label] == records[label].error for label in ("s0", "s1", "s2", "s3"))
    assert not errors["s4"] and trials["s5"].data.metrics["eval/avg"] == pytest.approx(0.55)
    assert faulty_sweep.injected == Counter(ENDPOINT_FAULTS)
    tally(cases=1, faults=4 + len(ENDPOINT_FAULTS), trials=len(trials), lost=0)


def test_harness_tables_marks_the_failed_trials(faulty_sweep: FaultySweep, tally: Any) -> None:
    md = faulty_sweep.tables_md
    assert "Missing: 4 of 6 grid cells have no FINISHED run" in md, md
    for label in ("s0", "s1", "s2", "s3"):
        first_line = (faulty_sweep.records[label].error or "").splitlines()[0]
        assert f"{label} (FAILED: {first_line[:40]}" in md, md
    tally(cases=1, trials=6)


def test_a_planted_api_key_is_written_nowhere(
    faulty_sweep: FaultySweep, ray_instance: Any, tally: Any
) -> None:
    """The key went to the endpoint (whose error answers echo it) while the sweep built its corpus,
    and sat in every trial's environment: no file the sweep wrote (corpus, journal, rejects,
    manifest, the MLflow SQLite store's bytes and artifacts, Ray Tune's files, trial folders,
    tables), no Ray session log and nothing printed or logged holds it."""
    tmp = faulty_sweep.tmp
    assert (tmp / "mlflow.db").is_file() and (tmp / "corpus" / "work" / "journal.jsonl").is_file()
    session = Path(ray_instance._private.worker._global_node.get_session_dir_path())
    searched = assert_secret_absent(
        PLANTED_KEY, [tmp, session / "logs"], [*faulty_sweep.printed, faulty_sweep.tables]
    )
    tally(cases=1, searched=searched)


def _finished(tmp_path: Path, name: str) -> int:
    try:
        return sum(r.info.status == "FINISHED" for r in runs(tmp_path, name, "trial"))
    except Exception:
        return 0


def _kill_driver_at_random_moment(exp: Path, address: str, rng: random.Random, first: bool) -> bool:
    """Start a driver that joins the module's Ray and SIGKILL it: in the first round at a random
    moment of its start-up (imports, joining Ray, creating the store), later at a random moment
    after one more trial finished. False when it finished before the kill came."""
    proc = start_driver(exp, "steady", address)
    try:
        if first:
            time.sleep(rng.uniform(0.0, 4.0))
        else:
            for line in proc.stdout or ():  # read the store only once this driver has opened it
                if line.startswith("plan "):
                    break
            done, t0 = _finished(exp.parent, "driver-kill"), time.monotonic()
            while _finished(exp.parent, "driver-kill") <= done and proc.poll() is None:
                assert time.monotonic() - t0 < 240, "no trial finished in time"
                time.sleep(0.3)
            time.sleep(rng.uniform(0.0, 1.5))
        finished = proc.poll() is not None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    return not finished


def test_repeated_sigkill_of_the_sweep_driver_loses_no_trial_and_repeats_none(
    ray_instance: Any, tmp_path: Path, tiny_corpus_dir: Path, tally: Any
) -> None:
    """Drivers that join the module's Ray cluster (as ``harness sweep --address`` does) are killed
    with SIGKILL at random moments (once by default, more with NM_FAULTS_FULL=1); then one runs to
    the end. Every grid cell has exactly one FINISHED run, with the trial_key and the score of an
    uninterrupted run; runs the dead drivers left RUNNING are KILLED; ``harness tables`` finds
    every cell."""
    seed = int(os.environ.get("NM_FAULTS_SEED", time.time_ns() % 100_000))
    rng, kills = random.Random(seed), repeats(ci=1, full=4)
    seeds = list(range(4))
    exp = write_experiment(tmp_path, tiny_corpus_dir, "driver-kill", grid={"seed": seeds})
    address = ray_instance.get_runtime_context().gcs_address
    landed = sum(
        _kill_driver_at_random_moment(exp, address, rng, first=i == 0) for i in range(kills)
    )
    last = start_driver(exp, "steady", address)
    out, _ = last.communicate(timeout=300)
    assert last.returncode == 0, out

    sha = read_manifest(tiny_corpus_dir)["samples_sha256"]
    base = load_experiment(exp)
    expected = {
        trial_spec(base, cell, sha).label: trial_spec(base, cell, sha).key
        for cell in grid_cells(base)
    }
    trials = runs(tmp_path, "driver-kill", "trial")
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == sorted(expected), f"seed {seed}"
    for run in finished:
        assert run.data.tags["trial_key"] == expected[run.info.run_name]
        assert run.data.metrics["eval/avg"] == pytest.approx(
            0.5 + json.loads(run.data.tags["harness.cell"])["train.seed"] / 100
        )
    assert {r.info.status for r in trials} <= {"FINISHED", "KILLED"}, f"seed {seed}"
    assert {r.info.status for r in runs(tmp_path, "driver-kill", "sweep")} <= {"FINISHED", "KILLED"}
    assert (
        f"All {len(seeds)} grid cells have a FINISHED run."
        in run_tables(exp, tmp_path / "tables")[1]
    )
    tally(cases=kills + 1, faults=landed, trials=len(finished), lost=len(expected) - len(finished))
