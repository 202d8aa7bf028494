"""The untrained model of an arm (``harness/untrained.py``): what its key depends on, and its
scores computed once and read back, with the packaged MiniLM and a real STS subset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from harness.config import trial_key
from harness.experiment_file import validate
from harness.untrained import arm_key, untrained_metric, untrained_scores

SHA = "cd" * 32


def experiment(tmp_path: Path, **overrides) -> object:
    data = {
        "name": "arms",
        "corpus": {"path": str(tmp_path / "corpus")},
        "model": {"name": "packaged:all-minilm-l6-v2", "pooling": "mean"},
        "train": {"heldout_before": True, "heldout_size": 4},
        "eval": {"tasks": [str(tmp_path / "BIOSSES")], "batch_size": 8},
    }
    for dotted, value in overrides.items():
        section, name = dotted.split("__")
        data.setdefault(section, {})[name] = value
    return validate(data)


def test_the_arm_key_ignores_training_settings_not_the_model(tmp_path: Path) -> None:
    base = arm_key(experiment(tmp_path), SHA)
    # the seed, the schedule, the lr and LoRA's shape do not change the model before step 1
    for same in (
        {"train__seed": 7},
        {"train__strategy": "reverse"},
        {"train__lr": 1e-3},
        {"model__lora": {"r": 4}},
        {"train__steps": 9},
    ):
        assert arm_key(experiment(tmp_path, **same), SHA) == base, same
    # ...pooling, template, lengths, the tasks and the held-out rows do
    for other in (
        {"model__pooling": "ata"},
        {"model__template": "llm2vec"},
        {"model__max_query_length": 32},
        {"eval__tasks": [str(tmp_path / "STS16")]},
        {"train__heldout_size": 8},
    ):
        assert arm_key(experiment(tmp_path, **other), SHA) != base, other
    assert arm_key(experiment(tmp_path), "ef" * 32) != base  # another corpus, other held-out rows
    # eval.untrained never changes a trial's key: committed stores keep matching
    assert trial_key(experiment(tmp_path, eval__untrained=False), SHA) == trial_key(
        experiment(tmp_path), SHA
    )


def test_metric_names() -> None:
    assert untrained_metric("eval/avg") == "eval_base/avg"
    assert untrained_metric("eval/STS") == "eval_base/STS"
    assert untrained_metric("heldout/recall_at_1") == "heldout_base/recall_at_1"


def test_scored_once_then_read_back_and_a_bad_cache_is_scored_again(
    tmp_path: Path, shared_data: Path, tiny_corpus_dir: Path
) -> None:
    from test_eval_run import sts_subset

    from harness.embedder import Embedder
    from synth.corpus import read_corpus

    sts_subset(shared_data, tmp_path, "BIOSSES", 10)
    exp = experiment(tmp_path)
    heldout = read_corpus(tiny_corpus_dir).frame.sort("id").head(4)
    embedder = Embedder.from_settings(exp.model, "cpu", lora=True)
    cache = tmp_path / "cache"
    first = untrained_scores(exp, embedder, heldout, corpus_sha256=SHA, cache_dir=cache)
    assert {"eval_base/BIOSSES", "eval_base/avg", "heldout_base/recall_at_1"} <= set(first)
    assert all(math.isfinite(v) for v in first.values())
    (path,) = cache.glob("*.json")
    assert json.loads(path.read_text()) == pytest.approx(first)

    # the second trial of the arm reads the file: an empty held-out frame proves no rescoring
    again = untrained_scores(exp, embedder, pl.DataFrame(), corpus_sha256=SHA, cache_dir=cache)
    assert again == pytest.approx(first)

    # a torn or non-finite cache file is not trusted: scored again and rewritten
    path.write_text(json.dumps({**first, "eval_base/avg": float("nan")}))
    rescored = untrained_scores(exp, embedder, heldout, corpus_sha256=SHA, cache_dir=cache)
    assert rescored == pytest.approx(first, abs=1e-5)
    assert json.loads(path.read_text()) == pytest.approx(first, abs=1e-5)
