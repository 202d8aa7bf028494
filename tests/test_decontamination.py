"""Corpora checked against the evaluation: real SNLI rows against real STS test sets, a corpus the
sweep builds (``corpus.build``, real mining with MiniLM), ``harness check`` and ``harness
decontaminate``. Fails before: nothing compared a corpus with the evaluation tasks."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl
import yaml
from conftest import snli_frame
from rich.console import Console
from typer.testing import CliRunner

from harness.cli import app
from harness.corpora import load_corpus
from harness.decontamination import decontaminate_corpus, eval_texts
from harness.experiment_file import load_experiment
from synth.corpus import read_corpus, read_manifest, write_corpus
from synth.decontaminate import find, normalize, normalized_set


def test_normalisation_matches_case_space_and_punctuation_only() -> None:
    assert normalize("A man is playing a guitar.") == normalize("a  MAN is playing a guitar")
    assert normalize("Ｆｕｌｌ-width, ok!") == "full width ok"  # NFKC
    assert normalize("A man is playing a guitar") != normalize("A man plays a guitar")
    frame = pl.DataFrame(
        {
            "query": ["Q one", "Q two", "Q three"],
            "positive": ["A man is playing a guitar.", "p", "p"],
            "neg_1": ["n", None, "two dogs run."],
        }
    )
    found = find(
        frame,
        {
            "STS": normalized_set(["a man is playing a guitar"]),
            "B": normalized_set(["Two dogs RUN"]),
        },
    )
    assert found.keep.to_list() == [False, True, False]
    assert found.dropped == {"STS": 1, "B": 1} and found.rows_dropped == 2


def experiment(tmp_path: Path, corpus_dir: Path, tasks: list[str], **extra) -> Path:
    data = {
        "name": "decon",
        "corpus": {"path": str(corpus_dir), **extra.pop("corpus_extra", {})},
        "eval": {"tasks": tasks},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        **extra,
    }
    path = tmp_path / "decon.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_snli_rows_holding_sts_test_sentences_are_dropped_and_counted(
    tmp_path: Path, shared_data: Path
) -> None:
    """The whole real SNLI pool against STSBenchmark and SICK-R: every dropped row holds one of
    their texts, no kept row does (checked here with plain lower-casing, independently)."""
    corpus = write_corpus(snli_frame(shared_data, 3000), tmp_path / "snli", name="snli")
    tasks = [str(shared_data / "STSBenchmark"), str(shared_data / "SICK-R")]
    exp = load_experiment(experiment(tmp_path, corpus.path, tasks))
    clean, _ = decontaminate_corpus(exp, corpus, tmp_path / "clean")
    entry = clean.manifest["decontamination"]
    assert entry["dropped"]["STSBenchmark"] > 0 and entry["dropped"]["SICK-R"] > 0
    assert entry["rows_before"] == len(corpus) == len(clean) + entry["rows_dropped"]
    assert entry["source_sha256"] == corpus.sha256
    assert set(entry["tasks"]) == {"STSBenchmark", "SICK-R"}
    assert read_corpus(tmp_path / "clean").sha256 == clean.sha256  # a valid corpus folder

    def plain(folder: str) -> set[str]:
        lines = (Path(folder) / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]
        return {t.strip().lower().rstrip(".") for line in lines for t in line.split("\t")[:2]}

    sts = plain(tasks[0]) | plain(tasks[1])
    columns = ["query", "positive", "neg_1", "neg_2", "neg_3", "neg_4"]

    def hit(row: dict) -> bool:
        return any(row[c] and row[c].strip().lower().rstrip(".") in sts for c in columns)

    assert not any(hit(r) for r in clean.frame.iter_rows(named=True))
    kept_ids = set(clean.frame["id"])
    dropped = [r for r in corpus.frame.iter_rows(named=True) if r["id"] not in kept_ids]
    assert len(dropped) == entry["rows_dropped"]
    assert sum(hit(r) for r in dropped) >= 0.9 * len(dropped)  # the rest differ in punctuation


def test_a_corpus_the_sweep_builds_is_decontaminated(tmp_path: Path, shared_data: Path) -> None:
    """corpus.build mines SNLI rows; an evaluation task holding five of their sentences costs
    exactly the rows that contain them, recorded in the built corpus's manifest."""
    task = tmp_path / "Leaky"
    task.mkdir()

    def write_task(sentences: list[str]) -> None:
        (task / "test.tsv").write_text(
            "sentence1\tsentence2\tscore\n"
            + "".join(f"{s.upper()}\tsomething else {i}\t{i}\n" for i, s in enumerate(sentences)),
            encoding="utf-8",
        )

    write_task(["nothing to see here"])
    mine_cfg = tmp_path / "mine.yaml"
    mine_cfg.write_text(
        f"data_root: {shared_data}\nmodel: packaged:all-minilm-l6-v2\nseed: 0\n"
        "bands: [[1, 5], [6, 15], [16, 40], [41, 100]]\n"
        "sources:\n  - path: SNLI-triplets\n    name: snli\n    task_kind: symmetric\n"
        "    instruction: Retrieve semantically similar text\n    max_rows: 200\n",
        encoding="utf-8",
    )
    columns = ("query", "positive", "neg_1", "neg_2", "neg_3", "neg_4")

    def build(folder: str, decontaminate: bool):
        corpus_settings = {
            "build": {"kind": "mine", "config": str(mine_cfg)},
            "decontaminate": decontaminate,
        }
        exp = load_experiment(
            experiment(tmp_path, tmp_path / folder, [str(task)], corpus_extra=corpus_settings)
        )
        console = Console(file=io.StringIO(), record=True, width=300)
        return load_corpus(exp, console), console.export_text()

    raw, raw_log = build("raw", False)  # the same mining, kept whole (mining is deterministic)
    assert "decontamination" not in raw.manifest
    assert "was not checked against evaluation task(s) Leaky" in raw_log
    leaked = raw.frame["positive"].to_list()[:50:10]  # five of its texts leak into the task
    write_task(leaked)
    norm = {normalize(t) for t in leaked}
    corpus, log = build("built", True)
    entry = corpus.manifest["decontamination"]
    leaky = {
        r["id"]
        for r in raw.frame.iter_rows(named=True)
        if any(normalize(r[c] or "") in norm for c in columns)
    }
    assert len(leaky) >= 5 and entry["dropped"] == {"Leaky": len(leaky)}
    assert set(corpus.frame["id"]) == set(raw.frame["id"]) - leaky
    assert entry["rows_before"] == len(raw) and entry["source_sha256"] == raw.sha256
    assert "decontaminated against 1 evaluation task(s)" in log and "not checked" not in log


def test_check_warns_and_decontaminate_writes_a_checked_copy(
    tmp_path: Path, shared_data: Path
) -> None:
    corpus = write_corpus(snli_frame(shared_data, 400), tmp_path / "snli", name="snli")
    tasks = [str(shared_data / "STSBenchmark")]
    path = experiment(tmp_path, corpus.path, tasks)
    runner = CliRunner()
    checked = runner.invoke(app, ["check", str(path)])
    assert checked.exit_code == 0
    assert "was not checked against evaluation task(s) STSBenchmark" in checked.output

    # never over the corpus itself, never over a folder this command did not write
    itself = runner.invoke(app, ["decontaminate", str(path), "--out", str(corpus.path)])
    assert itself.exit_code == 2 and "is the input" in itself.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["decontaminate", str(path), "--out", str(foreign), "--force"])
    assert refused.exit_code == 2 and "not a folder harness decontaminate wrote" in refused.output
    assert (foreign / "notes.txt").read_text() == "mine"

    made = runner.invoke(app, ["decontaminate", str(path)])
    assert made.exit_code == 0, made.output
    clean = tmp_path / "snli-clean"
    assert "STSBenchmark" in read_manifest(clean)["decontamination"]["tasks"]
    assert read_corpus(corpus.path).sha256 == corpus.sha256  # the source is untouched
    again = runner.invoke(app, ["decontaminate", str(path)])
    assert again.exit_code == 2 and "--force replaces it" in again.output
    assert runner.invoke(app, ["decontaminate", str(path), "--force"]).exit_code == 0

    pointed = experiment(tmp_path, clean, tasks)
    quiet = runner.invoke(app, ["check", str(pointed)])
    assert quiet.exit_code == 0 and "not checked" not in quiet.output
    # a task added to the file later is unchecked again
    more = experiment(tmp_path, clean, [*tasks, str(shared_data / "BIOSSES")])
    assert "task(s) BIOSSES" in runner.invoke(app, ["check", str(more)]).output
    assert eval_texts(load_experiment(more)).unreadable == []
