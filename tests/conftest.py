"""Shared test set-up: offline by default, real data from ../shared/data, small real models."""

from __future__ import annotations

import os
import random
from pathlib import Path

# Never let a test wait on the Hugging Face Hub (unreachable here): fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$NM_SHARED_DATA`` or the ``shared/data`` folder beside the checkout."""
    env = os.environ.get("NM_SHARED_DATA")
    if env:
        return Path(env)
    for base in (REPO.parent, REPO.parent.parent):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    return REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared evaluation data not found at {d} (set NM_SHARED_DATA)")
    return d


def snli_frame(shared: Path, n: int = 200, seed: int = 0):
    """A small corpus frame from the real SNLI triplets: neg_1 = the contradiction hypothesis,
    neg_2..neg_4 = entailments of other premises (unrelated, so easier). For unit tests of the
    format and the trainer; graded mining lives in ``synth mine``."""
    import json

    from synth.corpus import RowBuilder

    rows = [json.loads(l) for l in (shared / "SNLI-triplets" / "train.jsonl").open(encoding="utf-8")]
    rows = [r for r in rows if r.get("negative")][: n * 2]
    rng = random.Random(seed)
    builder = RowBuilder()
    for r in rows[:n]:
        others = rng.sample(rows, 3)
        builder.add(
            source="snli",
            task_kind="symmetric",
            subtask="sts",
            instruction="Retrieve semantically similar text.",
            query=r["query"],
            positive=r["positive"],
            negatives=[r["negative"], *(o["positive"] for o in others)],
        )
    return builder.frame()


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory, shared_data) -> Path:
    from synth.corpus import write_corpus

    d = tmp_path_factory.mktemp("corpus") / "snli-tiny"
    write_corpus(snli_frame(shared_data, 120), d, name="snli-tiny", build={"kind": "test-fixture"})
    return d


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from synth.packaged import resolve

    return Path(resolve("packaged:smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from synth.packaged import resolve

    return Path(resolve("packaged:all-minilm-l6-v2"))
