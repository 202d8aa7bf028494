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


def test_pair_classification_and_reranking_scores_match_an_independent_computation(
    minilm, shared_data: Path, tmp_path: Path
) -> None:
    """MRPC's max_ap and WikiQA's MAP, through the harness (mteb's evaluators), equal the same
    numbers computed here from MiniLM's embeddings with scikit-learn and a hand-written AP."""
    import numpy as np
    from sklearn.metrics import average_precision_score

    settings = EvalSettings(
        tasks=[str(shared_data / "MRPC"), str(shared_data / "WikiQA")],
        max_examples=60,
        instructions=NO_INSTRUCTIONS,
    )
    result = evaluate_embedder(
        minilm, settings, output_dir=tmp_path, name="test/minilm-pairs", progress=False
    )
    assert set(result.frame["category"]) == {"PairClassification", "Reranking"}
    assert {"eval/PairClassification", "eval/Reranking", "eval/avg"} <= set(result.metrics)

    def embed(texts: list[str]) -> np.ndarray:
        out = minilm.encode(texts, batch_size=32).float().numpy()
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    mrpc = load_local_task(shared_data / "MRPC", max_examples=60)
    mrpc.load_data()
    test = mrpc.dataset["test"]
    a, b = embed(test["sentence1"]), embed(test["sentence2"])
    labels = np.asarray(test["labels"])
    aps = [
        average_precision_score(labels, (a * b).sum(1)),  # cosine = dot on unit vectors
        average_precision_score(labels, -np.abs(a - b).sum(1)),  # manhattan
        average_precision_score(labels, -np.linalg.norm(a - b, axis=1)),  # euclidean
    ]
    assert result.metrics["eval/MRPC"] == pytest.approx(max(aps), abs=2e-3)

    wikiqa = load_local_task(shared_data / "WikiQA", max_examples=60)
    wikiqa.load_data()
    split = wikiqa.dataset["default"]["test"]
    docs = dict(zip(split["corpus"]["id"], embed(split["corpus"]["text"])))
    queries = dict(zip(split["queries"]["id"], embed(split["queries"]["text"])))
    average_precisions = []
    for qid, candidates in split["top_ranked"].items():
        ranked = sorted(candidates, key=lambda d: -float(queries[qid] @ docs[d]))
        relevant = split["relevant_docs"][qid]
        hits, precisions = 0, []
        for rank, d in enumerate(ranked, 1):
            if d in relevant:
                hits += 1
                precisions.append(hits / rank)
        average_precisions.append(sum(precisions) / len(relevant))
    assert result.metrics["eval/WikiQA"] == pytest.approx(np.mean(average_precisions), abs=2e-3)
