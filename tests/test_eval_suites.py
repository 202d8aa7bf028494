"""Suites, task resolution, offline failures and per-task instructions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.config import EvalSettings
from harness.evaluation.instructions import Instructions
from harness.evaluation.local_tasks import LocalFolderTask
from harness.evaluation.suites import (
    TaskResolutionError,
    check_hub_access,
    resolve_tasks,
    suite,
    task_entries,
)


def test_mteb_en_is_the_classic_english_benchmark() -> None:
    import mteb

    classic = {t.metadata.name for t in mteb.get_benchmark("MTEB(eng, v1)").tasks}
    assert len(suite("mteb-en").tasks) == 56
    assert set(suite("mteb-en").tasks) == classic
    retrieval = {
        t.metadata.name
        for t in mteb.get_benchmark("MTEB(eng, v1)").tasks
        if t.metadata.type == "Retrieval"
    }
    assert set(suite("retrieval").tasks) == retrieval and len(retrieval) == 15


def test_named_tasks_resolve_as_the_benchmark_configures_them() -> None:
    sts17, reviews, msmarco = resolve_tasks(["STS17", "AmazonReviewsClassification", "MSMARCO"])
    assert sts17.hf_subsets == ["en-en"]  # English only, as in the paper's table
    assert reviews.hf_subsets == ["en"] and list(reviews.eval_splits) == ["test"]
    assert list(msmarco.eval_splits) == ["dev"]


def test_local_suites_resolve_folders_under_the_data_dir(shared_data: Path) -> None:
    tasks = resolve_tasks(task_entries(EvalSettings(suite="local")), data=shared_data)
    assert [t.metadata.name for t in tasks] == [
        "STSBenchmark", "STS12", "STS13", "STS14", "STS15", "STS16", "SICK-R", "BIOSSES",
        "SciFact", "Banking77Classification",
    ]  # fmt: skip
    assert all(isinstance(t, LocalFolderTask) for t in tasks)
    check_hub_access(tasks)  # local folders never need the Hub


def test_suite_and_explicit_tasks_merge_without_repeats() -> None:
    entries = task_entries(
        EvalSettings(suite="local-small", tasks=["${NM_SHARED_DATA}/BIOSSES", "x/STS12"])
    )
    assert entries == [
        "${NM_SHARED_DATA}/BIOSSES",
        "${NM_SHARED_DATA}/STSBenchmark",
        "${NM_SHARED_DATA}/SciFact",
        "x/STS12",
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            EvalSettings(suite="mteb-fr"),
            "unknown suite 'mteb-fr'; known suites: mteb-en, retrieval",
        ),
        (
            EvalSettings(tasks=["STSBenchmarc"]),
            "unknown task 'STSBenchmarc'.*Did you mean: 'STSBenchmark'",
        ),
        (EvalSettings(), "nothing to evaluate"),
    ],
)
def test_unknown_suites_and_tasks_are_named(settings: EvalSettings, message: str) -> None:
    with pytest.raises(TaskResolutionError, match=message):
        resolve_tasks(task_entries(settings))


def test_hub_task_offline_fails_fast_with_a_clear_message(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = resolve_tasks(["NFCorpus", "CQADupstackRetrieval"])
    started = time.perf_counter()
    with pytest.raises(TaskResolutionError) as err:
        check_hub_access(tasks)
    assert time.perf_counter() - started < 2
    assert "cannot evaluate NFCorpus, CQADupstackRetrieval: HF_HUB_OFFLINE is set" in str(err.value)
    assert "local task folders" in str(err.value)


def test_instructions_follow_e5_mistral_per_side() -> None:
    from mteb.types import PromptType

    ins = Instructions()
    scifact = "Given a scientific claim, retrieve documents that support or refute the claim"
    assert ins.for_input("SciFact", "Retrieval", PromptType.query) == scifact
    assert ins.for_input("SciFact", "Retrieval", PromptType.document) is None
    assert ins.for_input("STSBenchmark", "STS", None) == "Retrieve semantically similar text."
    assert ins.for_input("CQADupstackGisRetrieval", "Retrieval", PromptType.query).startswith(
        "Given a question, retrieve detailed"
    )
    assert (
        ins.for_input("MyOwnFolder", "Retrieval", PromptType.query)
        == "Given a query, retrieve documents that answer the query"
    )
    custom = Instructions({"SciFact": "Find evidence", "*": ""})
    assert custom.for_input("SciFact", "Retrieval", PromptType.query) == "Find evidence"
    assert custom.for_input("STS12", "STS", None) is None  # "*": "" turns the others off
    assert (
        custom.fingerprint() != Instructions({"*": ""}).fingerprint()
        and Instructions().fingerprint() is None
    )


def test_every_mteb_en_task_has_the_instruction_mteb_ships() -> None:
    """Our list and mteb's task prompts (both from E5-mistral) agree wherever mteb has one."""
    from mteb.types import PromptType

    ins = Instructions()
    for task in resolve_tasks(suite("mteb-en").tasks):
        meta = task.metadata
        ours = ins.for_input(meta.name, meta.type, PromptType.query)
        assert ours, meta.name
        shipped = meta.prompt.get("query") if isinstance(meta.prompt, dict) else meta.prompt
        if shipped:
            assert ours == shipped, meta.name


def test_without_shared_data_the_error_says_how_to_point_at_it(monkeypatch, tmp_path) -> None:
    """No NM_SHARED_DATA and no shared/data beside the checkout: the error names the variable and
    gives --data-dir only to the command that has it (fails before: it told every command, `sweep`
    and `check` included, to pass --data-dir, which they do not take)."""
    from harness.evaluation import suites

    monkeypatch.delenv("NM_SHARED_DATA", raising=False)
    monkeypatch.setattr(suites, "_CHECKOUT", tmp_path / "a" / "checkout")
    with pytest.raises(suites.TaskResolutionError) as info:
        suites.data_dir()
    message = str(info.value)
    assert "set NM_SHARED_DATA=/path/to/shared/data" in message
    assert "(`harness eval` also takes --data-dir)" in message
