"""The harness evaluation end to end on small real local tasks with real packaged models."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from harness.config import EvalSettings, ModelSettings
from harness.evaluation import evaluate_embedder
from harness.evaluation.encoder import EmbedderEncoder
from harness.evaluation.instructions import Instructions
from harness.evaluation.local_tasks import load_local_task

NO_INSTRUCTIONS = {"*": ""}  # MiniLM is not an instruction model


def sts_subset(shared: Path, into: Path, name: str, pairs: int) -> Path:
    """The first ``pairs`` rows of a real STS set, in a folder carrying the mteb task's name."""
    folder = into / name
    folder.mkdir(parents=True)
    lines = (shared / name / "test.tsv").read_text(encoding="utf-8").splitlines()[: pairs + 1]
    (folder / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def scifact_subset(shared: Path, into: Path, queries: int) -> Path:
    """SciFact with the qrels of its first test queries (the corpus is capped by max_docs)."""
    folder = into / "SciFact"
    (folder / "qrels").mkdir(parents=True)
    for f in ("corpus.jsonl", "queries.jsonl"):
        os.symlink(shared / "SciFact" / f, folder / f)
    lines = (shared / "SciFact" / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    keep = list(dict.fromkeys(line.split("\t")[0] for line in lines[1:]))[:queries]
    (folder / "qrels" / "test.tsv").write_text(
        "\n".join([lines[0], *(line for line in lines[1:] if line.split("\t")[0] in keep)]) + "\n",
        encoding="utf-8",
    )
    return folder


class CountingEmbedder:
    """The real embedder, recording what mteb asked it to encode (to see instructions and cache hits)."""

    def __init__(self, embedder) -> None:
        self.inner = embedder
        self.name, self.revision, self.settings = (
            embedder.name,
            embedder.revision,
            embedder.settings,
        )
        self.calls: list[tuple[int, str | None]] = []

    def encode(self, texts, **kwargs):
        self.calls.append((len(texts), kwargs.get("instruction")))
        return self.inner.encode(texts, **kwargs)


@pytest.fixture(scope="module")
def minilm():
    from harness.embedder import Embedder

    return Embedder.from_settings(
        ModelSettings(name="packaged:all-minilm-l6-v2", pooling="mean"), "cpu"
    )


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory, shared_data: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("tasks")
    return [
        shared_data / "BIOSSES",
        sts_subset(shared_data, root, "STSBenchmark", 200),
        scifact_subset(shared_data, root, 20),
    ]


@pytest.fixture(scope="module")
def smoke(minilm, small_suite, tmp_path_factory):
    settings = EvalSettings(
        tasks=[str(p) for p in small_suite],
        max_docs=100,
        instructions=NO_INSTRUCTIONS,
        batch_size=64,
    )
    return evaluate_embedder(
        minilm,
        settings,
        output_dir=tmp_path_factory.mktemp("eval"),
        name="test/minilm-smoke",
        progress=False,
    )


def test_small_local_suite_through_the_harness(smoke) -> None:
    df = smoke.frame
    assert df["task"].to_list() == ["SciFact", "BIOSSES", "STSBenchmark"]
    assert df["category"].to_list() == ["Retrieval", "STS", "STS"]
    assert df["main_score"].to_list() == ["ndcg_at_10", "cosine_spearman", "cosine_spearman"]
    scores = dict(zip(df["task"], df["score"]))
    assert scores["BIOSSES"] == pytest.approx(
        0.8125, abs=0.01
    )  # MTEB leaderboard: 81.64 (data differs +0.4%)
    assert 0.7 < scores["STSBenchmark"] < 0.95 and 0.5 < scores["SciFact"] <= 1
    assert df.filter(df["task"] == "SciFact")["note"][0].startswith(
        "corpus capped to 100 of 5183 documents"
    )
    assert set(smoke.metrics) == {
        "eval/SciFact",
        "eval/BIOSSES",
        "eval/STSBenchmark",
        "eval/Retrieval",
        "eval/STS",
        "eval/avg",
    }
    assert smoke.metrics["eval/STS"] == pytest.approx(
        (scores["BIOSSES"] + scores["STSBenchmark"]) / 2
    )
    files = {p.name for p in smoke.result_dir.iterdir()}
    assert {
        "BIOSSES.json",
        "STSBenchmark.json",
        "SciFact.json",
        "model_meta.json",
        "scores.csv",
        "summary.json",
    } <= files
    summary = json.loads((smoke.result_dir / "summary.json").read_text())
    assert summary["meta_name"] == "test/minilm-smoke" and "SciFact" in summary["notes"]
    assert "max_docs_100" in str(
        smoke.result_dir
    )  # a capped run never reads an uncapped one's cache


def test_harness_equals_direct_mteb_evaluate(smoke, minilm, small_suite, minilm_dir: Path) -> None:
    import mteb
    from sentence_transformers import SentenceTransformer

    folder = small_suite[1]
    harness = smoke.frame.filter(smoke.frame["task"] == "STSBenchmark")["score"][0]
    encoder = EmbedderEncoder(minilm, instructions=Instructions(NO_INSTRUCTIONS))
    direct = mteb.evaluate(encoder, load_local_task(folder), cache=None, show_progress_bar=False)
    assert direct.task_results[0].get_score() == pytest.approx(harness, abs=1e-6)
    # and the Embedder + wrapper give what mteb's own sentence-transformers wrapper gives
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    reference = mteb.evaluate(st, load_local_task(folder), cache=None, show_progress_bar=False)
    assert reference.task_results[0].get_score() == pytest.approx(harness, abs=1e-4)


def test_results_are_cached_per_model_name(minilm, shared_data: Path, tmp_path: Path) -> None:
    spy = CountingEmbedder(minilm)
    settings = EvalSettings(
        tasks=[str(sts_subset(shared_data, tmp_path, "BIOSSES", 30))], instructions=NO_INSTRUCTIONS
    )
    first = evaluate_embedder(
        spy, settings, output_dir=tmp_path / "eval", name="trial-a", progress=False
    )
    assert len(spy.calls) == 2  # the two sides of the pairs
    again = evaluate_embedder(
        spy, settings, output_dir=tmp_path / "eval", name="trial-a", progress=False
    )
    assert len(spy.calls) == 2  # read back from mteb's cache (which rounds to 6 decimals)
    assert again.metrics == pytest.approx(first.metrics, abs=1e-6)
    other = evaluate_embedder(
        spy, settings, output_dir=tmp_path / "eval", name="trial-b", progress=False
    )
    assert (
        len(spy.calls) == 4 and other.result_dir != first.result_dir
    )  # another model never shares it


def test_smollm2_with_instructions_on_both_sides_of_sts(shared_data: Path, tmp_path: Path) -> None:
    from harness.embedder import Embedder

    embedder = Embedder.from_settings(
        ModelSettings(name="packaged:smollm2-135m-instruct", pooling="mean"), "cpu"
    )
    spy = CountingEmbedder(embedder)
    settings = EvalSettings(
        tasks=[str(sts_subset(shared_data, tmp_path, "BIOSSES", 10))], batch_size=16
    )
    result = evaluate_embedder(spy, settings, output_dir=tmp_path / "eval", progress=False)
    assert [instruction for _, instruction in spy.calls] == [
        "Retrieve semantically similar text."
    ] * 2
    assert (
        math.isfinite(result.metrics["eval/BIOSSES"]) and -1 <= result.metrics["eval/BIOSSES"] <= 1
    )
    assert result.result_dir.parts[-2:] == (
        "smollm2-135m-instruct-mean",
        "base",
    )  # no experiment folder
