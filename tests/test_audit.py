"""`synth audit` with the real MiniLM on real corpora: the conftest SNLI fixture and a mined one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synth.audit import AUDIT_JSON, AUDIT_MD, audit_corpus
from synth.corpus import CorpusError, read_corpus
from synth.mine import mine
from synth.mine_config import config_from_sources


@pytest.fixture(scope="module")
def mined_snli(tmp_path_factory, shared_data) -> Path:
    out = tmp_path_factory.mktemp("audit") / "snli-mined"
    config = config_from_sources(
        [str(shared_data / "SNLI-triplets")],
        task_kind="symmetric",
        max_rows=80,
        seed=1,
        bands=[[1, 3], [4, 12], [13, 40], [41, 120]],
    )
    mine(config, out, progress=False)
    return out


def test_mined_levels_fall_monotonically(mined_snli: Path) -> None:
    sha = read_corpus(mined_snli).sha256
    report = audit_corpus(mined_snli, progress=False)
    assert report["rows"] == 80 and report["sampled_rows"] is None
    assert report["monotone_query"] is True
    assert report["spearman_query"] < -0.6
    levels = report["levels"]
    assert list(levels) == ["1", "2", "3", "4"]
    assert levels["1"]["query"]["mean"] > levels["4"]["query"]["mean"] + 0.2
    # the mining model with a margin leaves no negative above its positive
    assert all(lv["above_positive"] == 0 for lv in levels.values())
    assert report["by_source"]["SNLI-triplets"]["monotone_query"] is True
    # the audit files sit beside the corpus and leave its hash alone
    assert (
        json.loads((mined_snli / AUDIT_JSON).read_text())["spearman_query"]
        == report["spearman_query"]
    )
    md = (mined_snli / AUDIT_MD).read_text()
    assert "| level 4 | 80 |" in md and "to query yes" in md
    assert read_corpus(mined_snli).sha256 == sha


def test_fixture_corpus_contradictions_are_its_hardest_level(tiny_corpus_dir: Path) -> None:
    """neg_1 is the SNLI contradiction of the premise, neg_2..4 unrelated sentences."""
    report = audit_corpus(tiny_corpus_dir, max_rows=60, progress=False)
    assert report["sampled_rows"] == 60 and report["rows"] == 60
    levels = report["levels"]
    assert all(levels["1"]["query"]["mean"] > levels[lv]["query"]["mean"] + 0.1 for lv in "234")
    assert 0 <= levels["1"]["above_positive"] < 0.5


def test_bad_corpus_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="corpus directory does not exist"):
        audit_corpus(tmp_path / "nope", progress=False)
    with pytest.raises(CorpusError, match=r"no manifest\.json"):
        audit_corpus(tmp_path, progress=False)


def test_harness_audit_scores_levels_with_a_harness_model(mined_snli: Path, tmp_path: Path) -> None:
    """`harness audit CORPUS MODEL`: the same report, scored by a harness embedder (here the base
    MiniLM with ATA pooling and instructed queries, as training formats them), written to --out."""
    from typer.testing import CliRunner

    from harness.cli import app

    out = tmp_path / "audit"
    result = CliRunner().invoke(
        app,
        [
            "audit",
            str(mined_snli),
            "packaged:all-minilm-l6-v2",
            "--pooling",
            "ata",
            "--out",
            str(out),
            "--max-rows",
            "60",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / AUDIT_JSON).read_text())
    assert (
        report["pooling"] == "ata"
        and report["sampled_rows"] == 60
        and report["model"] == "packaged:all-minilm-l6-v2"
    )
    assert report["monotone_query"] is True and report["spearman_query"] < -0.4
    assert "(ata pooling)" in (out / AUDIT_MD).read_text()
    assert not (mined_snli / "nope").exists()
    bad = CliRunner().invoke(
        app, ["audit", str(tmp_path / "nope"), "packaged:all-minilm-l6-v2", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "corpus directory does not exist" in bad.output


def test_heldout_metrics_match_a_text_by_text_computation(tiny_corpus_dir: Path) -> None:
    """The batched, instruction-grouped held-out metrics equal a plain loop that embeds every text
    alone in its training format (query instructed; symmetric rows' documents instructed too)."""
    import torch

    from harness.config import ModelSettings
    from harness.embedder import Embedder
    from harness.heldout import heldout_metrics
    from harness.schedules import doc_instruction
    from synth.corpus import NEG_COLUMNS

    frame = read_corpus(tiny_corpus_dir).frame.head(24)
    embedder = Embedder.from_settings(
        ModelSettings(
            name="packaged:all-minilm-l6-v2", pooling="mean", max_query_length=48, max_doc_length=48
        ),
        "cpu",
    )
    got = heldout_metrics(embedder, frame, batch_size=8)

    def one(text: str, instruction: str | None, length: int) -> torch.Tensor:
        return torch.nn.functional.normalize(
            embedder.encode([text], instruction=instruction, max_length=length)[0], dim=0
        )

    wins: dict[int, list[bool]] = {1: [], 2: [], 3: [], 4: []}
    hits = 0
    rows = frame.to_dicts()
    for start in range(0, len(rows), 8):
        batch = rows[start : start + 8]
        queries = [one(r["query"], r["instruction"], 48) for r in batch]
        docs = [doc_instruction(r["instruction"], r["task_kind"]) for r in batch]
        positives = [one(r["positive"], d, 48) for r, d in zip(batch, docs)]
        negatives = [
            [one(r[c], d, 48) if r[c] is not None else None for c in NEG_COLUMNS]
            for r, d in zip(batch, docs)
        ]
        candidates = positives + [n[k] for k in range(4) for n in negatives if n[k] is not None]
        for i, q in enumerate(queries):
            pos = float(q @ positives[i])
            for k, neg in enumerate(negatives[i]):
                if neg is not None:
                    wins[k + 1].append(pos > float(q @ neg))
            hits += int(torch.stack([q @ c for c in candidates]).argmax()) == i
    assert got["heldout/recall_at_1"] == pytest.approx(hits / len(rows))
    for level, w in wins.items():
        assert got[f"heldout/acc_level_{level}"] == pytest.approx(sum(w) / len(w))
