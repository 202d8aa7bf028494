"""The untrained model of a trial's own configuration, scored once per arm and cached.

A trial's model before its first step is the base model with the trial's template, lengths,
attention, init adapter and pooling, and a LoRA at its initial identity (B = 0): it does not depend
on the seed, the schedule or any other training setting. Its scores are the reference a trained row
must beat (a training that makes the model worse ranks schedules by the damage they do), and they
are the same for every trial of an *arm*, so they are computed by the first trial of the arm on a
node and read from ``<cache>/<arm key>.json`` by the others (a concurrent trial of the same arm
waits for the one computing them instead of computing them too).

Logged at step 0 as ``heldout_base/*`` (``train.heldout_before``) and ``eval_base/*``
(``eval.untrained``): the tables turn them into one "untrained" row per arm.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.config import Experiment, content_key, key_data
from synth.locks import build_once

if TYPE_CHECKING:
    import polars as pl

    from harness.embedder import Embedder

HELDOUT_PREFIX, HELDOUT_BASE = "heldout/", "heldout_base/"
EVAL_PREFIX, EVAL_BASE = "eval/", "eval_base/"


def untrained_metric(metric: str) -> str:
    """The untrained model's name of a trained model's metric (``eval/avg`` -> ``eval_base/avg``)."""
    for prefix, base in ((HELDOUT_PREFIX, HELDOUT_BASE), (EVAL_PREFIX, EVAL_BASE)):
        if metric.startswith(prefix):
            return base + metric[len(prefix) :]
    return metric


def arm_key(exp: Experiment, corpus_sha256: str) -> str:
    """What the untrained scores depend on: the model settings but LoRA's, the evaluation, the
    held-out rows (corpus and size), and which of the two is scored."""
    data = key_data(exp)
    model = {k: v for k, v in data["model"].items() if k != "lora"}
    evaluation = {k: v for k, v in data["eval"].items() if k not in ("enabled", "untrained")}
    return content_key(
        {
            "model": model,
            "eval": evaluation if wants_eval(exp) else None,
            "heldout": [data["train"]["heldout_size"], corpus_sha256]
            if exp.train.heldout_before
            else None,
            "heldout_group": exp.train.batch_size if exp.train.heldout_before else None,
        }
    )


def wants_eval(exp: Experiment) -> bool:
    return exp.eval.enabled and exp.eval.untrained and bool(exp.eval.suite or exp.eval.tasks)


def wanted(exp: Experiment) -> bool:
    """Whether a trial of ``exp`` scores its untrained model at all."""
    return exp.train.heldout_before or wants_eval(exp)


def untrained_scores(
    exp: Experiment,
    embedder: Embedder,
    heldout: pl.DataFrame,
    *,
    corpus_sha256: str,
    cache_dir: Path | None,
    on_task: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """``heldout_base/*`` and ``eval_base/*`` of ``embedder`` before training, from the arm's cache
    file when there is one (written whole, after a finiteness check), else computed (and cached)."""
    if cache_dir is None:
        return _score(exp, embedder, heldout, None, on_task)
    key = arm_key(exp, corpus_sha256)
    path = cache_dir / f"{key}.json"

    def ready() -> bool:
        return _read(path) is not None

    def build() -> None:
        scores = _score(exp, embedder, heldout, cache_dir / key, on_task)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(scores, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)

    build_once(cache_dir / f"{key}.lock", ready, build)
    scores = _read(path)
    if scores is None:
        raise RuntimeError(f"untrained scores cache {path} is unreadable after it was written")
    return scores


def _read(path: Path) -> dict[str, float] | None:
    """The cached scores, or None for a missing, torn or non-finite file (then scored again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in data.values()
    ):
        return None
    return {str(k): float(v) for k, v in data.items()}


def _score(
    exp: Experiment,
    embedder: Embedder,
    heldout: pl.DataFrame,
    work: Path | None,
    on_task: Callable[[str], None] | None,
) -> dict[str, float]:
    from harness.heldout import heldout_metrics

    scores: dict[str, float] = {}
    was_training = embedder.training
    embedder.eval()  # as the trained model is scored (no dropout)
    try:
        if exp.train.heldout_before and heldout.height:
            scored = heldout_metrics(
                embedder, heldout, batch_size=exp.eval.batch_size, group_size=exp.train.batch_size
            )
            scores.update({untrained_metric(k): v for k, v in scored.items()})
        evaluated = None
        if wants_eval(exp) and work is not None:
            from harness.evaluation.run import evaluate_embedder

            evaluated = evaluate_embedder(
                embedder,
                exp.eval,
                output_dir=work / "mteb",
                name=f"untrained/{work.name}",
                progress=False,
                on_task=(lambda line: on_task(f"untrained: {line}")) if on_task else None,
            )
    finally:
        embedder.train(was_training)
    if evaluated is not None:
        scores.update(
            {
                untrained_metric(k if k.startswith(EVAL_PREFIX) else EVAL_PREFIX + k): v
                for k, v in evaluated.metrics.items()
            }
        )
    bad = [k for k, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"the untrained model scored non-finite {', '.join(sorted(bad))}")
    return scores
