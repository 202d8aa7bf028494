"""Local task folders become mteb tasks: metadata from mteb when the name matches, data from disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.evaluation.local_tasks import LocalFolderTask, LocalTaskError, load_local_task


def test_named_folders_are_mteb_tasks_reading_local_data(shared_data: Path) -> None:
    from mteb.tasks.classification.eng.banking77_classification import Banking77Classification
    from mteb.tasks.retrieval.eng.sci_fact_retrieval import SciFact
    from mteb.tasks.sts.eng.sts_benchmark_sts import STSBenchmarkSTS

    for name, cls, main_score in [
        ("STSBenchmark", STSBenchmarkSTS, "cosine_spearman"),
        ("SciFact", SciFact, "ndcg_at_10"),
        ("Banking77Classification", Banking77Classification, "accuracy"),
    ]:
        task = load_local_task(shared_data / name)
        assert isinstance(task, cls) and isinstance(task, LocalFolderTask)
        assert task.metadata.main_score == main_score
        assert task.eval_splits == cls.metadata.eval_splits
        assert task.metadata.dataset["revision"].startswith("local-")
        assert not task.data_loaded  # read lazily, when mteb evaluates

    sts = load_local_task(shared_data / "STSBenchmark")
    sts.load_data()
    assert sts.dataset["test"].num_rows == 1379  # the README's exact MTEB parity count
    clf = load_local_task(shared_data / "Banking77Classification")
    clf.load_data()
    assert clf.dataset["train"].num_rows == 10003 and clf.dataset["test"].num_rows == 3080
    names = json.loads((shared_data / "Banking77Classification" / "categories.json").read_text())
    assert clf.dataset["train"][0]["label"] == names.index(
        "card_arrival"
    )  # integer labels, as on the Hub


def test_unnamed_folder_gets_generic_metadata(tmp_path: Path, shared_data: Path) -> None:
    folder = tmp_path / "MyPairs"
    folder.mkdir()
    lines = (shared_data / "BIOSSES" / "test.tsv").read_text(encoding="utf-8").splitlines()[:21]
    (folder / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = load_local_task(folder)
    assert task.metadata.name == "MyPairs" and task.metadata.type == "STS"
    assert task.metadata.main_score == "cosine_spearman"
    task.load_data()
    assert task.dataset["test"].num_rows == 20


def test_max_docs_keeps_relevant_documents_deterministically(shared_data: Path) -> None:
    def kept() -> tuple[set[str], set[str], str]:
        task = load_local_task(shared_data / "SciFact", max_docs=400)
        task.load_data()
        split = task.dataset["default"]["test"]
        relevant = {d for docs in split["relevant_docs"].values() for d in docs}
        return set(split["corpus"]["id"]), relevant, task.note

    ids, relevant, note = kept()
    assert len(ids) == 400 and relevant <= ids
    assert note == "corpus capped to 400 of 5183 documents (all 283 relevant kept)"
    assert kept()[0] == ids  # the same sample every time


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "not a task folder"),
        (
            lambda d: (d / "test.tsv").write_text("a\tb\tscore\nx\ty\t1\n"),
            "lacks column(s) ['sentence1', 'sentence2']",
        ),
        (
            lambda d: (d / "test.tsv").write_text("sentence1\tsentence2\tscore\nx\ty\thigh\n"),
            "score column is not a number",
        ),
    ],
)
def test_malformed_folders_fail_naming_the_file(tmp_path: Path, setup, message: str) -> None:
    folder = tmp_path / "Broken"
    folder.mkdir()
    setup(folder)
    with pytest.raises(LocalTaskError, match="Broken") as err:
        load_local_task(folder).load_data()
    assert message in str(err.value)


def test_folder_named_like_a_task_of_another_type_is_refused(
    tmp_path: Path, shared_data: Path
) -> None:
    folder = tmp_path / "SciFact"
    shutil.copytree(shared_data / "BIOSSES", folder)
    with pytest.raises(
        LocalTaskError, match="holds a STS task, but mteb's task 'SciFact' is Retrieval"
    ):
        load_local_task(folder)


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(LocalTaskError, match="task folder not found"):
        load_local_task(tmp_path / "nowhere")


def test_pair_classification_and_reranking_layouts(shared_data: Path) -> None:
    """MRPC (sentence1, sentence2, label) and WikiQA's test_reranking.jsonl become mteb pair
    classification and reranking tasks (fails before: MRPC read as single-text classification,
    WikiQA refused)."""
    from mteb.abstasks import AbsTaskPairClassification, AbsTaskRetrieval

    mrpc = load_local_task(shared_data / "MRPC")
    assert isinstance(mrpc, AbsTaskPairClassification)
    assert mrpc.metadata.type == "PairClassification" and mrpc.metadata.main_score == "max_ap"
    mrpc.load_data()
    test = mrpc.dataset["test"]
    assert test.num_rows == 1725 and set(test["labels"]) == {0, 1}

    wikiqa = load_local_task(shared_data / "WikiQA")
    assert isinstance(wikiqa, AbsTaskRetrieval) and wikiqa.metadata.type == "Reranking"
    assert wikiqa.metadata.main_score == "map_at_1000"
    wikiqa.load_data()
    split = wikiqa.dataset["default"]["test"]
    rows = [json.loads(line) for line in (shared_data / "WikiQA" / "test_reranking.jsonl").open()]
    assert split["queries"].num_rows == sum(bool(r["positive"]) for r in rows) == 237
    # every query's candidates are exactly its positives and negatives, its positives relevant
    texts = dict(zip(split["corpus"]["id"], split["corpus"]["text"]))
    first = split["queries"]["id"][0]
    assert sorted(texts[d] for d in split["top_ranked"][first]) == sorted(
        rows[0]["positive"] + rows[0]["negative"]
    )
    assert {texts[d] for d in split["relevant_docs"][first]} == set(rows[0]["positive"])


def test_max_examples_is_a_seeded_sample_with_a_note(shared_data: Path) -> None:
    def load(name: str, cap: int):
        task = load_local_task(shared_data / name, max_examples=cap, max_docs=500)
        task.load_data()
        return task

    sts, again = load("STSBenchmark", 50), load("STSBenchmark", 50)
    assert sts.dataset["test"].num_rows == 50
    assert sts.dataset["test"]["sentence1"] == again.dataset["test"]["sentence1"]  # same sample
    assert sts.note == "50 of 1379 pairs (seeded sample)"
    clf = load("Banking77Classification", 100)
    assert clf.dataset["test"].num_rows == 100
    # the training pool: 8 texts per label, what one of mteb's undersampled experiments uses
    assert clf.dataset["train"].num_rows == 8 * 77
    assert set(clf.dataset["train"]["label"]) == set(range(77))
    assert (
        clf.note
        == "100 of 3080 test texts (seeded sample); training pool 8 per label (616 of 10003 texts)"
    )
    sci = load("SciFact", 30)
    split = sci.dataset["default"]["test"]
    assert split["queries"].num_rows == 30 and len(split["relevant_docs"]) == 30
    relevant = {d for docs in split["relevant_docs"].values() for d in docs}
    assert relevant <= set(split["corpus"]["id"]) and split["corpus"].num_rows == 500
    assert sci.note.startswith("30 of 300 queries (seeded sample); corpus capped to 500")
    rerank = load("WikiQA", 20)
    assert rerank.dataset["default"]["test"]["queries"].num_rows == 20
