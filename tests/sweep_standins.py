"""Stand-in trial functions for the sweep tests: fast and deterministic, so the tests exercise
Ray, the tracking layout, failures and resume without training a model (one test trains for real).
Ray workers import this module by name: the tests put ``tests/`` on their PYTHONPATH."""

from __future__ import annotations

import os
import time

from harness.trial import TrialOutput

SLOW_SEED = 1  # `kill_me`: the trial with this seed blocks until the test lets it go


def quick(exp, corpus, ctx):
    """Three logged steps and a small model artifact; ``mean`` pooling fails, like a bad cell."""
    for step in range(1, 4):
        ctx.report(step, {"train/loss": 1.0 / step, "train/lr": exp.train.lr, "train/examples_per_s": 10.0})
    if exp.model.pooling == "mean":
        raise RuntimeError("mean pooling refused on purpose")
    model = ctx.workdir / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "adapter_config.json").write_text('{"r": 8}')
    # a smooth function of the searched values, best at lr = 1e-3
    score = 1.0 - abs(exp.train.lr - 1e-3) * 100 + len(corpus) / 1e6
    return TrialOutput(
        metrics={"heldout/recall@1": 0.5, "eval/avg": score},
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
