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
