"""`synth verify`: teacher-verified levels with the real packaged MiniLM on real SNLI rows.

The corpus: SNLI triplets (neg_1 = the premise's contradiction, neg_2..4 = unrelated sentences, so
the teacher orders them well), half of them relabelled ``synthetic`` with their levels reversed
(the hardest negative at level 4, as a small generator writes them), one row whose level-2
negative is its positive (a false negative), and one whose negatives all copy the positive.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import snli_frame
from typer.testing import CliRunner

from harness.schedules import build_schedule
from synth.audit import audit_corpus
from synth.cli import app
from synth.corpus import NEG_COLUMNS, SYNTHETIC_SOURCE, read_corpus, write_corpus
from synth.merge import merge_corpora
from synth.outputs import OutputError
from synth.verify import (
    NO_NEGATIVE_LEFT,
    ORDER_CONTRADICTED,
    REJECTS_FILE,
    REPORT_FILE,
    Settings,
    VerifyError,
    decide,
    undo_verify,
    verify_corpus,
)

ROWS = 40


@pytest.fixture(scope="module")
def source(tmp_path_factory, shared_data) -> Path:
    frame = snli_frame(shared_data, ROWS, seed=3).sort("id").with_row_index("i")
    reversed_negs = [pl.col(c).alias(r) for c, r in zip(NEG_COLUMNS, reversed(NEG_COLUMNS))]
    frame = pl.concat(
        [
            frame.filter(pl.col("i") % 2 == 0),
            frame.filter(pl.col("i") % 2 == 1)
            .with_columns(*reversed_negs)
            .with_columns(source=pl.lit(SYNTHETIC_SOURCE)),
        ],
        how="diagonal",
    )
    frame = frame.with_columns(
        neg_2=pl.when(pl.col("i") == 0).then(pl.col("positive")).otherwise(pl.col("neg_2")),
    ).with_columns(
        [
            pl.when(pl.col("i") == 2).then(pl.col("positive")).otherwise(pl.col(c)).alias(c)
            for c in NEG_COLUMNS
        ]
    )
    out = tmp_path_factory.mktemp("verify") / "graded"
    write_corpus(frame.drop("i"), out, build={"kind": "test-fixture"})
    return out


def row(corpus: Path, i: int) -> dict:
    """Row ``i`` of the fixture (its order before the relabelling, by id)."""
    ids = read_corpus(corpus).frame["id"].to_list()
    return read_corpus(corpus).frame.filter(pl.col("id") == sorted(ids)[i]).row(0, named=True)


# ------------------------------------------------------------------ one row, no model


def test_reorder_sorts_the_kept_negatives_into_levels_and_drops_false_negatives() -> None:
    negs = ("a", "b", "c", "d")
    d = decide(negs, (0.1, 0.9, 0.5, 0.3), 0.8, Settings())
    # 0.9 >= 0.8: "b" is a likely false negative; the rest hardest first from level 1, so the
    # row lacks its easiest level (not the level "b" had)
    assert d.reason is None and d.dropped == (2,)
    assert d.negatives == ("c", "d", "a", None)
    # within the relative margin of the positive (0.77 >= 0.8 - 0.05 * 0.8) counts too
    assert decide(negs, (0.77, 0.5, 0.3, 0.1), 0.8, Settings()).dropped == (1,)
    assert decide(negs, (0.77, 0.5, 0.3, 0.1), 0.8, Settings(relative_margin=0)).dropped == ()
    # a missing level is one negative fewer
    assert decide(("a", None, "c", "d"), (0.1, None, 0.5, 0.3), 0.8, Settings()).negatives == (
        "c",
        "d",
        "a",
        None,
    )


def test_reject_keeps_the_order_within_tolerance() -> None:
    negs = ("a", "b", "c", "d")
    strict = Settings(mode="reject", tolerance=0.0)
    assert decide(negs, (0.6, 0.5, 0.4, 0.3), 0.9, strict).reason is None
    assert decide(negs, (0.6, 0.5, 0.52, 0.3), 0.9, strict).reason == ORDER_CONTRADICTED
    loose = Settings(mode="reject", tolerance=0.05)
    kept = decide(negs, (0.6, 0.5, 0.52, 0.3), 0.9, loose)
    assert kept.reason is None and kept.negatives == negs
    # a false negative is dropped and the rest judged without it
    kept = decide(negs, (0.95, 0.5, 0.4, 0.3), 0.9, strict)
    assert kept.reason is None and kept.negatives == (None, "b", "c", "d")
    assert decide(negs, (0.95, 0.99, 0.9, 0.91), 0.9, strict).reason == NO_NEGATIVE_LEFT


def test_bad_settings_are_one_line_errors(source: Path, tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match="--relative-margin"):
        verify_corpus(source, tmp_path / "x", Settings(relative_margin=1.5))
    with pytest.raises(OutputError, match="is the input"):
        verify_corpus(source, source, Settings())
    result = CliRunner().invoke(
        app, ["verify", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "corpus directory does not exist" in result.output


# ------------------------------------------------------------------ the real teacher


@pytest.fixture(scope="module")
def reordered(source: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "reordered"
    verify_corpus(source, out, Settings(mode="reorder"), progress=False)
    return out


def test_reorder_repairs_reversed_levels(source: Path, reordered: Path) -> None:
    corpus = read_corpus(reordered)
    build = corpus.manifest["build"]
    counts = build["counts"]
    assert build["source"]["samples_sha256"] == read_corpus(source).sha256
    assert counts["rows_verified"] == ROWS and counts["rows_passed_through"] == 0
    # the row whose negatives all copy its positive is the one rejected
    assert counts["rows_rejected"] == {NO_NEGATIVE_LEFT: 1}
    assert counts["rows_kept"] == len(corpus) == ROWS - 1
    assert counts["false_negatives_dropped"]["2"] >= 1
    # the reversed half is put back in order (the teacher agrees with SNLI on most rows)
    assert counts["rows_reordered"] >= 0.8 * ROWS / 2
    before, after = build["audit_before"], build["audit_after"]
    assert before["monotone_query"] is False and after["monotone_query"] is True
    assert after["spearman_query"] < before["spearman_query"] - 0.3
    # the audit command, run on the result, agrees
    assert audit_corpus(reordered, progress=False)["monotone_query"] is True
    # reversible: the original negatives are kept in the rows ...
    frame = corpus.frame
    assert frame["verify_original"].list.len().to_list() == [4] * frame.height
    # ... and the rejected one in rejects.parquet, with its reason
    rejects = pl.read_parquet(reordered / REJECTS_FILE)
    assert rejects["reason"].to_list() == [NO_NEGATIVE_LEFT]
    assert "| after | 39 |" in (reordered / REPORT_FILE).read_text()


def test_undo_rebuilds_the_source_byte_for_byte(source: Path, reordered: Path, tmp_path) -> None:
    restored = undo_verify(reordered, tmp_path / "restored")
    assert restored.sha256 == read_corpus(source).sha256
    assert restored.name == read_corpus(source).name
    with pytest.raises(VerifyError, match="not a corpus written by synth verify"):
        undo_verify(source, tmp_path / "again")


def test_a_verified_corpus_is_not_verified_again(reordered: Path, tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match="already verified"):
        verify_corpus(reordered, tmp_path / "twice", Settings())


def test_reject_mode_drops_the_reversed_rows(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "rejected"
    corpus = verify_corpus(source, out, Settings(mode="reject"), progress=False)
    counts = corpus.manifest["build"]["counts"]
    assert counts["rows_reordered"] == 0
    contradicted = counts["rows_rejected"].get(ORDER_CONTRADICTED, 0)
    assert contradicted >= 0.8 * ROWS / 2
    # what is left is mostly the rows in SNLI order, with their order unchanged
    frame = corpus.frame
    assert frame.filter(pl.col("source") == SYNTHETIC_SOURCE).height <= 0.2 * ROWS / 2
    # ... each negative at its level, or dropped there as a likely false negative
    assert all(
        r[c] in (None, original)
        for r in frame.iter_rows(named=True)
        for c, original in zip(NEG_COLUMNS, r["verify_original"])
    )
    assert corpus.manifest["build"]["audit_after"]["monotone_query"] is True
    assert pl.read_parquet(out / REJECTS_FILE).height == sum(counts["rows_rejected"].values())


def test_synthetic_rows_only(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "synthetic-only"
    corpus = verify_corpus(source, out, Settings(rows="synthetic"), progress=False)
    counts = corpus.manifest["build"]["counts"]
    assert counts["rows_verified"] == ROWS // 2 and counts["rows_passed_through"] == ROWS // 2
    original = read_corpus(source).frame
    passed = corpus.frame.filter(pl.col("source") != SYNTHETIC_SOURCE)
    assert passed["verify_original"].null_count() == passed.height
    assert (
        passed.select("id", *NEG_COLUMNS)
        .sort("id")
        .equals(
            original.filter(pl.col("source") != SYNTHETIC_SOURCE)
            .select("id", *NEG_COLUMNS)
            .sort("id")
        )
    )


def test_verified_corpus_trains_and_merges(source: Path, reordered: Path, tmp_path) -> None:
    """The verify_* columns are optional: the trainer's schedule and `synth merge` take them."""
    corpus = read_corpus(reordered)
    schedule = build_schedule(corpus.frame, "curriculum", steps=4, batch_size=4, seed=0)
    assert len(schedule.batches) == 4
    plain = tmp_path / "plain"
    write_corpus(read_corpus(source).frame.head(5), plain)
    merged = merge_corpora([reordered, plain], tmp_path / "merged")
    assert "verify_original" in merged.frame.columns
    assert merged.frame.filter(pl.col("verify_original").is_null()).height >= 1


def test_cli(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app, ["verify", str(source), "--out", str(out), "--mode", "reject", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "verified; rejected:" in result.output and (out / REPORT_FILE).is_file()
    result = CliRunner().invoke(app, ["verify", str(out), "--undo", "--out", str(tmp_path / "u")])
    assert result.exit_code == 0, result.output
    assert read_corpus(tmp_path / "u").sha256 == read_corpus(source).sha256


# ------------------------------------------------------------------ undo, checked


@pytest.fixture(scope="module")
def rejected(source: Path, tmp_path_factory) -> Path:
    """Verified in reject mode: many rows in rejects.parquet, so one can go missing."""
    out = tmp_path_factory.mktemp("verify") / "rejected"
    verify_corpus(source, out, Settings(mode="reject"), progress=False)
    assert pl.read_parquet(out / REJECTS_FILE).height >= 5
    return out


def _shortened(path: Path) -> None:
    frame = pl.read_parquet(path)
    frame.head(frame.height - 3).write_parquet(path)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbled(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def _edited(path: Path) -> None:  # same rows, one text changed
    frame = pl.read_parquet(path).with_row_index("i")
    frame.with_columns(
        positive=pl.when(pl.col("i") == 0).then(pl.lit("changed")).otherwise(pl.col("positive"))
    ).drop("i").write_parquet(path)


def _doubled(path: Path) -> None:  # a row twice: more rows than the source had
    frame = pl.read_parquet(path)
    pl.concat([frame, frame.head(1)]).write_parquet(path)


def _emptied(path: Path) -> None:
    pl.read_parquet(path).head(0).write_parquet(path)


@pytest.mark.faults
@pytest.mark.parametrize(
    "damage",
    [_shortened, _truncated, _garbled, _edited, _doubled, _emptied],
    ids=lambda f: f.__name__[1:],
)
def test_undo_refuses_damaged_rejects_and_writes_nothing(
    source: Path, rejected: Path, tmp_path: Path, damage, tally
) -> None:
    """A rejects.parquet that lost, gained or changed rows rebuilds a corpus that is not the
    source: the row count and sha256 recorded in the manifest refuse it, in one line."""
    verified = tmp_path / "verified"
    shutil.copytree(rejected, verified)
    damage(verified / REJECTS_FILE)
    out = tmp_path / "restored"
    result = CliRunner().invoke(app, ["verify", str(verified), "--undo", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1, result.output
    assert str(verified) in result.output and "nothing written" in result.output, result.output
    assert not out.exists()
    tally(cases=1, faults=1, rows=read_corpus(source).frame.height)
    # the undamaged corpus still rebuilds its source exactly
    shutil.copy2(rejected / REJECTS_FILE, verified / REJECTS_FILE)
    assert undo_verify(verified, out).sha256 == read_corpus(source).sha256
