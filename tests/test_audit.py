"""`synth audit` with the real MiniLM on real corpora: the conftest SNLI fixture and a mined one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synth.audit import AUDIT_JSON, AUDIT_MD, audit_corpus
from synth.corpus import CorpusError, read_corpus
from synth.mine import config_from_sources, mine


@pytest.fixture(scope="module")
def mined_snli(tmp_path_factory, shared_data) -> Path:
    out = tmp_path_factory.mktemp("audit") / "snli-mined"
    config = config_from_sources(
        [str(shared_data / "SNLI-triplets")], task_kind="symmetric", max_rows=80, seed=1,
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
    assert json.loads((mined_snli / AUDIT_JSON).read_text())["spearman_query"] == report["spearman_query"]
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
    with pytest.raises(CorpusError, match="no manifest.json"):
        audit_corpus(tmp_path, progress=False)
