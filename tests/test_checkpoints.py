"""Checkpoints inside a trial (``train.checkpoint_every``): a training resumed from one is the
uninterrupted training, step for step; a sweep whose trial worker is SIGKILLed finishes that trial
from its last checkpoint with one continuous MLflow curve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient
from sweep_util import runs, write_experiment

from harness import checkpoints
from harness.checkpoints import Checkpointing, TrainState
from harness.config import trial_key
from harness.experiment_file import load_experiment
from harness.train import train_one
from synth.corpus import read_corpus

# MiniLM with LoRA dropout: the resumed run only matches if the RNG states come back too.
MODEL = {
    "name": "packaged:all-minilm-l6-v2",
    "pooling": "mean",
    "lora": {"r": 4, "dropout": 0.1},
    "max_query_length": 24,
    "max_doc_length": 24,
}
TRAIN = {
    "steps": 8,
    "batch_size": 8,
    "warmup_steps": 2,
    "heldout_size": 16,
    "device": "cpu",
    "checkpoint_every": 3,
    "seed": 7,
}


def _experiment(tmp_path: Path, corpus_dir: Path, name: str = "ckpt", **train):
    path = write_experiment(
        tmp_path, corpus_dir, name, model=MODEL, train={**TRAIN, **train}, eval={"enabled": False}
    )
    return load_experiment(path)


def _losses(stream) -> dict[int, float]:
    return {step: m["train/loss"] for step, m in stream if "train/loss" in m}


def _adapter(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (weights,) = Path(model_dir).rglob("adapter_model.safetensors")
    return load_file(weights)


def _train(exp, corpus, out: Path, checkpointing: Checkpointing | None):
    return train_one(exp, corpus, output_dir=out, progress=False, checkpointing=checkpointing)


def test_training_resumed_from_a_checkpoint_is_the_uninterrupted_training(
    tmp_path, tiny_corpus_dir
):
    exp = _experiment(tmp_path, tiny_corpus_dir)
    corpus = read_corpus(tiny_corpus_dir)
    saved: list[bytes] = []
    full = _train(
        exp,
        corpus,
        tmp_path / "full",
        Checkpointing(3, lambda s: saved.append(checkpoints.to_bytes(s))),
    )
    states = [checkpoints.from_bytes(b) for b in saved]
    assert [s.step for s in states] == [3, 6]  # every 3 steps, not after the last (8)

    resumed = _train(exp, corpus, tmp_path / "resumed", Checkpointing(3, lambda s: None, states[0]))

    assert resumed.resumed_from == 3
    assert _losses(resumed.stream) == _losses(full.stream)  # the stream: the checkpoint's + redone
    assert resumed.heldout == full.heldout
    a, b = _adapter(full.model_dir), _adapter(resumed.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_the_rng_states_the_resumed_run_differs(tmp_path, tiny_corpus_dir):
    """The test above can fail: dropout draws from the RNG, so a checkpoint without the RNG
    states does not give the uninterrupted run."""
    exp = _experiment(tmp_path, tiny_corpus_dir)
    corpus = read_corpus(tiny_corpus_dir)
    saved: list[TrainState] = []
    full = _train(exp, corpus, tmp_path / "full", Checkpointing(3, saved.append))
    torch.manual_seed(12345)  # what a fresh process would hold instead of the saved states
    stale = torch.get_rng_state()
    state = saved[0]
    state.rng = {**state.rng, "torch": stale}
    resumed = _train(exp, corpus, tmp_path / "stale", Checkpointing(3, lambda s: None, state))
    assert _losses(resumed.stream)[4] != _losses(full.stream)[4]


def test_a_checkpoint_for_another_model_is_refused(tmp_path, tiny_corpus_dir):
    exp = _experiment(tmp_path, tiny_corpus_dir, steps=2)
    corpus = read_corpus(tiny_corpus_dir)
    state = TrainState(
        step=1, weights={"not.a.weight": torch.zeros(1)}, optimizer={}, scheduler={}, rng={}
    )
    with pytest.raises(ValueError, match="does not fit this model"):
        _train(exp, corpus, tmp_path / "x", Checkpointing(3, lambda s: None, state))


def test_checkpoint_settings_are_not_in_the_trial_key(tmp_path, tiny_corpus_dir):
    exp = _experiment(tmp_path, tiny_corpus_dir)
    other = exp.model_copy(deep=True)
    other.train.checkpoint_every, other.train.keep_checkpoints = None, 5
    assert trial_key(exp, "sha") == trial_key(other, "sha")


def test_a_checkpoint_is_replaced_whole(tmp_path):
    folder = tmp_path / "checkpoint"
    assert checkpoints.read(folder) is None
    checkpoints.write(b"first", folder)
    checkpoints.write(b"second", folder)
    assert checkpoints.read(folder) == b"second"
    # a kill between moving the old one aside and putting the new one in place
    os.replace(folder, folder.with_name("checkpoint.old"))
    assert checkpoints.read(folder) == b"second"
    checkpoints.discard(folder)
    assert checkpoints.read(folder) is None and not list(tmp_path.iterdir())


# ---- a real sweep whose trial worker is SIGKILLed ------------------------------------------------

KILL_TRAIN = {**TRAIN, "steps": 20, "checkpoint_every": 4}
HARNESS = "import sys; from harness.cli import app; sys.argv[0] = 'harness'; app()"


def _trial_workers(root: psutil.Process) -> list[psutil.Process]:
    """The Ray actor running the trial (its title names Tune's function trainable)."""
    found = []
    for proc in root.children(recursive=True):
        try:
            if "ImplicitFunc" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _logged_steps(tmp_path: Path) -> int:
    try:
        (run,) = runs(tmp_path, "killed", "trial")
    except Exception:  # the store or the run does not exist yet
        return 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return max(
        (m.step for m in client.get_metric_history(run.info.run_id, "train/loss")), default=0
    )


def _uninterrupted(path: Path, corpus_dir: Path, out: Path):
    """The uninterrupted training of the trial of experiment file ``path``, here without Ray, on
    one thread as the trial (Ray gives a 1-CPU worker one thread; another count rounds sums
    differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_one(
            load_experiment(path), read_corpus(corpus_dir), output_dir=out, progress=False
        )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(600)
def test_a_sweep_finishes_a_killed_trial_from_its_last_checkpoint(tmp_path, tiny_corpus_dir):
    path = write_experiment(
        tmp_path,
        tiny_corpus_dir,
        "killed",
        model=MODEL,
        train=KILL_TRAIN,
        eval={"enabled": False},
        resources={"cpus_per_trial": 1, "max_failures": 1},
        tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics": False},
    )
    sweep = subprocess.Popen(  # `harness sweep` as a user runs it (results/ in the cwd)
        [sys.executable, "-c", HARNESS, "sweep", str(path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
    )
    root = psutil.Process(sweep.pid)
    killed_after = None
    deadline = time.time() + 300
    while time.time() < deadline and sweep.poll() is None:
        step = _logged_steps(tmp_path)
        every = KILL_TRAIN["checkpoint_every"]
        if step > every and step % every != 0:  # a checkpoint exists, and steps after it
            (worker,) = _trial_workers(root)
            worker.send_signal(signal.SIGKILL)
            killed_after = step
            break
        time.sleep(0.05)
    output, _ = sweep.communicate(timeout=300)
    assert killed_after is not None, f"the trial finished before it could be killed:\n{output}"
    assert sweep.returncode == 0, output

    (run,) = runs(tmp_path, "killed", "trial")
    assert run.info.status == "FINISHED"
    resumed = run.data.tags["harness.resumed"]  # "step C after step K"
    _, checkpoint_step, _, _, reached = resumed.split()
    checkpoint_step, reached = int(checkpoint_step), int(reached)
    every = KILL_TRAIN["checkpoint_every"]
    assert checkpoint_step % every == 0 and checkpoint_step > 0  # not from step 0
    assert reached >= killed_after
    assert reached - checkpoint_step <= every  # steps redone
    said = " ".join(output.split())  # the console wraps long lines
    assert "resumed from its checkpoint" in said and "retry 1 of 1" in said
    # one line each for the failure and the resume; no traceback, no Tune checkpoint chatter
    assert "Traceback" not in output and "Checkpoint(" not in output, output

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, KILL_TRAIN["steps"] + 1))  # one value per step

    full = _uninterrupted(path, tiny_corpus_dir, tmp_path / "full")
    logged = {m.step: m.value for m in history}
    expected = _losses(full.stream)
    assert logged == expected
    (trained,) = (tmp_path / "results" / "models").rglob("embedder.json")
    a, b = _adapter(full.model_dir), _adapter(trained.parent)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "results" / "models").rglob(checkpoints.STATE_FILE))  # cleaned up


def test_a_rerun_resumes_from_the_checkpoint_in_the_trial_folder(
    ray_instance, tmp_path, tiny_corpus_dir
):
    """A sweep killed mid-trial (driver and all) and run again: the trial on the same node finds
    its last checkpoint in its folder and continues from it (Tune's own checkpoints belong to the
    killed sweep). ``--no-resume`` starts from step 0."""
    from harness.config import path_part
    from harness.trial import CHECKPOINT_DIR, KIND, STEP, run_spec, trial_spec

    base = _experiment(tmp_path, tiny_corpus_dir)
    corpus = read_corpus(tiny_corpus_dir)
    spec = trial_spec(base, {}, corpus.sha256)
    models = tmp_path / "models"
    saved: list[bytes] = []
    _train(
        spec.exp,
        corpus,
        tmp_path / "first",
        Checkpointing(3, lambda s: saved.append(checkpoints.to_bytes(s))),
    )
    sent: list[dict] = []
    # the step-6 checkpoint, where the killed sweep's trial left it
    workdir = models / path_part(spec.exp.name) / path_part(f"{spec.label}-{spec.key}")
    checkpoints.write(saved[1], workdir / CHECKPOINT_DIR)
    run_spec(send=sent.append, spec=spec, corpus=corpus, models_dir=str(models))
    kinds = [(r[KIND], r.get(STEP)) for r in sent if r[KIND] in ("resume", "step")]
    assert kinds[0] == ("resume", 6)
    assert next(s for k, s in kinds if k == "step") == 7  # nothing before the checkpoint again
    assert not (workdir / CHECKPOINT_DIR).exists()  # the finished training superseded it

    sent.clear()
    checkpoints.write(saved[1], workdir / CHECKPOINT_DIR)
    (workdir / "trained.json").unlink()
    run_spec(
        send=sent.append, spec=spec, corpus=corpus, models_dir=str(models), reuse_training=False
    )
    assert "resume" not in [r[KIND] for r in sent]
    assert min(r[STEP] for r in sent if r[KIND] == "step") <= 1


# ---- a real sweep whose driver is SIGKILLed, then run again --------------------------------------

DRIVER_KILL_TRAIN = {**KILL_TRAIN, "checkpoint_every": 8}  # a kill window of 7 steps (9-15)


def _trial_runs(tmp_path: Path, name: str) -> list:
    try:
        return runs(tmp_path, name, "trial")
    except Exception:  # the store or the experiment does not exist yet
        return []


def _reached(client: MlflowClient, run_id: str) -> int:
    return max((m.step for m in client.get_metric_history(run_id, "train/loss")), default=0)


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_a_sweep_rerun_after_its_driver_was_killed_continues_the_trial_run(
    tmp_path, tiny_corpus_dir, tally
):
    """`harness sweep` SIGKILLed (driver, its local Ray and the trial with it) after a checkpoint
    of the trial and before the next, then run again: the trial resumes from the checkpoint in its folder, and
    the earlier run of the trial is continued, so one FINISHED run holds the whole curve, one value
    per step, equal to the uninterrupted training's; no KILLED copy of it is left."""
    path = write_experiment(
        tmp_path,
        tiny_corpus_dir,
        "rerun",
        model=MODEL,
        train=DRIVER_KILL_TRAIN,
        eval={"enabled": False},
        resources={"cpus_per_trial": 1},
        tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics": False},
    )
    command = [sys.executable, "-c", HARNESS, "sweep", str(path)]
    env = {**os.environ, "COLUMNS": "100"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    every = DRIVER_KILL_TRAIN["checkpoint_every"]
    first = subprocess.Popen(  # its own process group: the kill takes the Ray it started
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    killed_after = 0
    try:
        for line in first.stdout:  # the store exists once the plan is printed
            if line.startswith("plan "):
                break
        deadline = time.time() + 400
        while time.time() < deadline and first.poll() is None:
            found = _trial_runs(tmp_path, "rerun")
            step = _reached(client, found[0].info.run_id) if found else 0
            if step > every and step % every != 0:  # a checkpoint exists, and steps after it
                killed_after = step
                break
            time.sleep(0.05)
    finally:
        leader = psutil.Process(first.pid)
        group = [leader, *leader.children(recursive=True)]
        os.killpg(first.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs(group, timeout=60)
        for proc in alive:  # a process of the group that left it (none expected)
            proc.kill()
        output = first.communicate()[0]
    assert killed_after, f"the trial finished before its driver could be killed:\n{output}"
    (killed,) = _trial_runs(tmp_path, "rerun")
    reached = _reached(client, killed.info.run_id)

    second = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=400
    )
    output = second.stdout + second.stderr
    assert second.returncode == 0, output
    assert "Traceback" not in output, output

    (run,) = _trial_runs(tmp_path, "rerun")  # one run of the trial, none KILLED beside it
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    _, checkpoint_step, _, _, resumed_after = run.data.tags["harness.resumed"].split()
    checkpoint_step = int(checkpoint_step)
    assert checkpoint_step % every == 0 and checkpoint_step > 0  # not from step 0
    # K: the last step the run held; the trial may have been a step ahead of the store, with
    # that step's checkpoint, which the rerun logs from the checkpoint
    assert int(resumed_after) == max(reached, checkpoint_step) and reached >= killed_after
    said = " ".join(output.split())  # the console wraps long lines
    assert f"resumed from its checkpoint at step {checkpoint_step}" in said, output
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, DRIVER_KILL_TRAIN["steps"] + 1))
    parents = sorted(r.info.status for r in runs(tmp_path, "rerun", "sweep"))
    assert parents == ["FINISHED", "KILLED"]
    assert run.data.tags["mlflow.parentRunId"] in {
        r.info.run_id for r in runs(tmp_path, "rerun", "sweep") if r.info.status == "FINISHED"
    }

    full = _uninterrupted(path, tiny_corpus_dir, tmp_path / "full")
    assert {m.step: m.value for m in history} == _losses(full.stream)
    tally(cases=1, faults=1, rows=len(history), trials=1)
