"""Stand-in trial functions for the sweep tests: fast and deterministic, so the tests exercise
Ray, the tracking layout, failures and resume without training a model (one test trains for real).
Ray workers import this module by name: the tests put ``tests/`` on their PYTHONPATH."""

from __future__ import annotations

import os
import signal
import time

from harness.trial import TrialOutput

SLOW_SEED = 1  # `kill_me`: the trial with this seed blocks until the test lets it go


def quick(exp, corpus, ctx):
    """Three logged steps and a small model artifact; ``mean`` pooling fails, like a bad cell."""
    for step in range(1, 4):
        ctx.report(
            step, {"train/loss": 1.0 / step, "train/lr": exp.train.lr, "train/examples_per_s": 10.0}
        )
    if exp.model.pooling == "mean":
        raise RuntimeError("mean pooling refused on purpose")
    model = ctx.workdir / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "adapter_config.json").write_text('{"r": 8}')
    # a smooth function of the searched values, best at lr = 1e-3
    score = 1.0 - abs(exp.train.lr - 1e-3) * 100 + len(corpus) / 1e6
    return TrialOutput(
        metrics={"heldout/recall_at_1": 0.5, "eval/avg": score},
        artifacts={"model": model},
        tags={"harness.level_order": "4,3,2,1"},
    )


def sleepy(exp, corpus, ctx):
    """Holds its (fake) GPU for a while, so overlapping trials would show."""
    ctx.report(1, {"train/loss": 1.0})
    time.sleep(1.5)
    return TrialOutput(metrics={"eval/avg": 0.5})


def kill_me(exp, corpus, ctx):
    """Seed 0 finishes at once; seed SLOW_SEED waits while the file named by $SWEEP_TEST_BLOCK exists."""
    ctx.report(1, {"train/loss": 1.0})
    block = os.environ.get("SWEEP_TEST_BLOCK", "")
    while exp.train.seed == SLOW_SEED and block and os.path.exists(block):
        time.sleep(0.2)
    return TrialOutput(metrics={"eval/avg": 0.5})


def faulty(exp, corpus, ctx):
    """A trial per way of failing, by seed: 0 loads the experiment's model with the real loader (the
    tests name one that does not exist); 1 raises; 2 asks torch's CPU allocator for the activations
    of a batch far larger than any machine's memory (a real allocation failure, raised at once:
    the cheap stand-in for a large batch on a small memory limit); 3 dies by SIGKILL without a
    word, as a trial the kernel's out-of-memory killer ends; the others finish."""
    ctx.report(1, {"train/loss": 1.0})
    seed = exp.train.seed
    if seed == 0:
        from harness.models import load_backbone, pick_device

        load_backbone(exp.model, pick_device("cpu"))
    if seed == 1:
        raise ValueError("trial raised on purpose")
    if seed == 2:
        import torch

        torch.empty(
            (exp.train.batch_size * 2**20, exp.model.max_doc_length, 576), dtype=torch.float32
        )
    if seed == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return TrialOutput(metrics={"eval/avg": 0.5 + seed / 100})


def steady(exp, corpus, ctx):
    """Three steps of 0.3 s and a score that depends only on the seed (the same in every rerun)."""
    for step in range(1, 4):
        time.sleep(0.3)
        ctx.report(step, {"train/loss": 1.0 / step})
    return TrialOutput(metrics={"eval/avg": 0.5 + exp.train.seed / 100})


def nan_score(exp, corpus, ctx):
    """A trial whose scores come out NaN for ``eos`` (a broken model scored): it must not FINISH."""
    ctx.report(1, {"train/loss": 1.0})
    return TrialOutput(metrics={"eval/avg": float("nan") if exp.model.pooling == "eos" else 0.5})


def slow_ata(exp, corpus, ctx):
    """eos finishes at once; ata keeps running (a second) so the sweep can stop under it."""
    ctx.report(1, {"train/loss": 1.0})
    if exp.model.pooling == "ata":
        time.sleep(1.0)
        ctx.report(2, {"train/loss": 0.5})
        time.sleep(30.0)
    return TrialOutput(metrics={"heldout/recall_at_1": 0.5, "eval/avg": 0.5})
