"""Kill the sweep driver (SIGKILL, no chance to clean up) after its first trial finished; the rerun
skips that trial, marks the dead driver's RUNNING runs KILLED and runs only what is missing. While
the first driver runs, a second sweep of the same experiment refuses; its lock dies with it."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import sweep_standins
from sweep_util import runs, start_driver, write_experiment

from harness.sweep import run_sweep
from synth.locks import LockedError

pytestmark = pytest.mark.faults


def _trials(tmp_path, name: str = "killed") -> dict[str, str]:
    try:
        return {r.info.run_name: r.info.status for r in runs(tmp_path, name, "trial")}
    except Exception:  # the store or the experiment does not exist yet
        return {}


def _two_trials(tmp_path, corpus, name: str):
    """Seed 0 finishes at once, seed SLOW_SEED (`kill_me`) waits: one trial at a time."""
    return write_experiment(
        tmp_path,
        corpus,
        name,
        grid={"seed": [0, sweep_standins.SLOW_SEED]},
        resources={"cpus_per_trial": 1, "max_concurrent_trials": 1},
    )


def test_rerun_after_driver_kill_skips_finished(tmp_path, tiny_corpus_dir, tally):
    exp = _two_trials(tmp_path, tiny_corpus_dir, "killed")
    block = tmp_path / "block"
    block.touch()
    first = start_driver(exp, "kill_me", SWEEP_TEST_BLOCK=str(block))
    try:
        # read the store only once the driver has created it (two processes migrating one new
        # SQLite file collide); the plan is printed after that
        for line in first.stdout:
            if line.startswith("plan "):
                break
        deadline = time.monotonic() + 240
        while _trials(tmp_path) != {"s0": "FINISHED", "s1": "RUNNING"}:
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, f"timed out; trials: {_trials(tmp_path)}"
            time.sleep(0.5)
        # a second sweep of the same experiment and store refuses at once, naming the running one
        with pytest.raises(
            LockedError,
            match=rf"a sweep of experiment 'killed' .* is already running \(pid {first.pid} on ",
        ):
            run_sweep(exp, [], results_dir=tmp_path / "other")
        assert not (tmp_path / "other").exists()
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already: the assertion above says why
            os.killpg(first.pid, signal.SIGKILL)
        first.communicate()

    block.unlink()
    second = start_driver(exp, "kill_me", SWEEP_TEST_BLOCK=str(block))
    out, _ = second.communicate(timeout=240)
    assert second.returncode == 0, out
    assert "skip s0" in out and "marked KILLED s1" in out, out
    parents = runs(tmp_path, "killed", "sweep")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
    trials = sorted((r.info.run_name, r.info.status) for r in runs(tmp_path, "killed", "trial"))
    assert trials == [("s0", "FINISHED"), ("s1", "FINISHED"), ("s1", "KILLED")]
    tally(cases=2, faults=1, trials=3)


def test_sigterm_stops_the_sweep_like_ctrl_c(tmp_path, tiny_corpus_dir, tally):
    """`kill PID` of the driver (SIGTERM) dumped a Ray C++ stack (exit 134) and left the running
    trial RUNNING; it must stop as Ctrl-C does: the running trial stopped and its run KILLED, the
    finished one kept, one line saying to run the same command again, and the rerun resumes."""
    exp = _two_trials(tmp_path, tiny_corpus_dir, "termed")
    block = tmp_path / "block"
    block.touch()
    trials = lambda: _trials(tmp_path, "termed")

    driver = start_driver(exp, "kill_me", SWEEP_TEST_BLOCK=str(block))
    try:
        lines = []
        for line in driver.stdout:  # the store exists once the plan is printed
            lines.append(line)
            if line.startswith("plan "):
                break
        deadline = time.monotonic() + 240
        while trials() != {"s0": "FINISHED", "s1": "RUNNING"}:
            assert driver.poll() is None, "".join(lines) + driver.communicate()[0]
            assert time.monotonic() < deadline, f"timed out; trials: {trials()}"
            time.sleep(0.5)
        driver.send_signal(signal.SIGTERM)  # the driver alone, as `kill PID` does
        out = "".join(lines) + driver.communicate(timeout=120)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.communicate()
    assert driver.returncode == 1, f"exit code {driver.returncode}: {out[-3000:]}"
    assert "run the same command again" in out, out[-3000:]
    assert "SIGTERM received" not in out and "*** " not in out, out[-3000:]  # no C++ stack dump
    assert trials() == {"s0": "FINISHED", "s1": "KILLED"}
    assert [r.info.status for r in runs(tmp_path, "termed", "sweep")] == ["KILLED"]

    block.unlink()
    rerun = start_driver(exp, "kill_me")
    out, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0 and "skip s0" in out, out
    statuses = sorted((r.info.run_name, r.info.status) for r in runs(tmp_path, "termed", "trial"))
    assert statuses == [("s0", "FINISHED"), ("s1", "FINISHED"), ("s1", "KILLED")]
    tally(cases=2, faults=1, trials=3)
