"""`synth mine` on real data (SNLI triplets, WikiQA, SciFact from shared/data) with the real MiniLM.

Subsamples keep the encoder work to about a thousand short texts; bands are scaled down to fit
the small pools.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from synth.corpus import NEG_COLUMNS, read_corpus
from synth.embed import encode, load_encoder
from synth.mine import mine, pick_negatives
from synth.mine_config import MineError, config_from_sources, load_config
from synth.sources import Columns, SourceError, read_beir, read_hub, read_local

SMALL_BANDS = [[1, 5], [6, 15], [16, 40], [41, 100]]


@pytest.fixture(scope="module")
def mined(tmp_path_factory, shared_data) -> Path:
    """SNLI (symmetric) and WikiQA (retrieval, several positives per query) mined into one corpus."""
    config = load_config_text(
        tmp_path_factory.mktemp("cfg"),
        f"""
data_root: {shared_data}
bands: {SMALL_BANDS}
seed: 3
sources:
  - path: SNLI-triplets
    name: snli
    task_kind: symmetric
    instruction: Retrieve semantically similar text
    max_rows: 120
  - path: WikiQA
    max_rows: 120
""",
    )
    out = tmp_path_factory.mktemp("mined") / "snli-wikiqa"
    mine(config, out, progress=False)
    return out


def load_config_text(folder: Path, text: str, name: str = "mine.yaml"):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def test_corpus_format_and_manifest(mined: Path) -> None:
    corpus = read_corpus(mined)  # validates schema and sha256
    frame = corpus.frame
    assert frame.height == 240
    modes = {
        p.name: p.stat().st_mode & 0o777
        for p in (mined / "manifest.json", mined / "samples.parquet")
    }
    assert modes["manifest.json"] == modes["samples.parquet"], modes  # mkstemp's 0600 would hide it
    assert frame.group_by("source").len().sort("source").rows() == [("WikiQA", 120), ("snli", 120)]
    snli = frame.filter(pl.col("source") == "snli")
    assert set(snli["task_kind"]) == {"symmetric"} and set(snli["subtask"]) == {"snli"}
    wikiqa = frame.filter(pl.col("source") == "WikiQA")
    assert set(wikiqa["task_kind"]) == {"retrieval"}
    assert set(wikiqa["instruction"]) == {
        "Given a query, retrieve relevant passages that answer the query"
    }
    for row in frame.iter_rows(named=True):
        negatives = [row[c] for c in NEG_COLUMNS]
        assert all(negatives), "the pools are large enough for every band"
        assert len(set(negatives)) == 4
        assert row["positive"] not in negatives and row["query"] not in negatives
    build = corpus.manifest["build"]
    assert build["kind"] == "mine" and build["model"] == "packaged:all-minilm-l6-v2"
    assert build["bands"]["level_4"] == [41, 100] and build["seed"] == 3
    assert build["seconds"] > 0
    assert [s["name"] for s in build["sources"]] == ["snli", "WikiQA"]
    assert all(s["pairs"] == 120 for s in build["sources"])


def test_levels_fall_in_similarity_to_the_query(mined: Path) -> None:
    frame = read_corpus(mined).frame
    texts = list(dict.fromkeys(t for c in ("query", "positive", *NEG_COLUMNS) for t in frame[c]))
    emb = encode(load_encoder(), texts, progress=False)
    index = {t: i for i, t in enumerate(texts)}

    def vectors(col: str) -> torch.Tensor:
        return emb[[index[t] for t in frame[col]]]

    query = vectors("query")
    positive_score = (query * vectors("positive")).sum(dim=1)
    means = []
    for col in NEG_COLUMNS:
        sims = (query * vectors(col)).sum(dim=1)
        # false-negative filter: every mined negative scores below its positive, by the margin
        assert bool((sims < positive_score - 0.05 * positive_score.abs() + 1e-4).all()), col
        means.append(float(sims.mean()))
    assert means == sorted(means, reverse=True) and means[0] > means[3] + 0.2, means


def test_other_positives_of_a_query_are_never_its_negatives(mined: Path, shared_data: Path) -> None:
    frame = read_corpus(mined).frame.filter(pl.col("source") == "WikiQA")
    positives: dict[str, set[str]] = {}
    for q, p in frame.select("query", "positive").iter_rows():
        positives.setdefault(q, set()).add(p)
    assert any(len(ps) > 1 for ps in positives.values()), (
        "the sample should hold multi-positive queries"
    )
    for row in frame.iter_rows(named=True):
        assert not positives[row["query"]] & {row[c] for c in NEG_COLUMNS}


def test_same_seed_same_corpus_other_seed_differs(tmp_path: Path, shared_data: Path) -> None:
    def run(seed: int, name: str) -> str:
        config = config_from_sources(
            [str(shared_data / "SNLI-triplets" / "train.jsonl")],
            max_rows=40,
            seed=seed,
            bands=[[1, 3], [4, 10], [11, 30], [31, 60]],
        )
        return mine(config, tmp_path / name, progress=False).sha256

    first = run(0, "a")
    assert run(0, "b") == first
    assert run(1, "c") != first


def test_pick_negatives_skips_false_negatives_and_excluded() -> None:
    """Hand-made geometry: 1 query, candidates at known cosines to it."""
    angles = torch.tensor([0.1, 0.2, 0.5, 0.6, 0.7, 1.0, 1.2, 1.4])  # radians from the query
    pool = torch.stack([angles.cos(), angles.sin()], dim=1)
    query = torch.tensor([[1.0, 0.0]])
    positive_score = torch.tensor([float(torch.cos(torch.tensor(0.45)))])  # ~0.900
    bands = [(1, 1), (2, 2), (3, 3), (4, 4)]
    first = torch.zeros(1, 4)  # always the first candidate of a band

    picks, skipped = pick_negatives(
        query, pool, positive_score, [[2]], bands=bands, relative_margin=0.0, uniforms=first
    )
    # 0 and 1 score above the positive (false negatives), 2 is excluded (e.g. another positive)
    assert skipped == 2
    assert picks.tolist() == [[3, 4, 5, 6]]

    picks, skipped = pick_negatives(
        query, pool, positive_score, [[2]], bands=bands, relative_margin=0.1, uniforms=first
    )
    # cos(0.6) = 0.825 and cos(0.7) = 0.765 fall within 10% of 0.900: skipped too
    assert skipped == 3  # 0, 1 and 3 (cos 0.825 >= 0.81); 4 (0.765) stays
    assert picks.tolist() == [[4, 5, 6, 7]]

    picks, _ = pick_negatives(
        query,
        pool,
        positive_score,
        [[]],
        bands=[(1, 2), (3, 4), (5, 9), (10, 20)],
        relative_margin=0.0,
        uniforms=torch.full((1, 4), 0.999),
    )
    # valid candidates 2..7 (six): bands pick their last available rank; band 4 is past the end
    assert picks.tolist() == [[3, 5, 7, -1]]


def test_beir_folder_gives_qrel_pairs_and_whole_corpus_pool(shared_data: Path) -> None:
    pair_set = read_beir(shared_data / "SciFact", "train")
    assert len(pair_set.pairs) == 919 and len(pair_set.documents) == 5183
    assert all(p.negative is None for p in pair_set.pairs)


@pytest.mark.faults
def test_bad_sources_are_named(tmp_path: Path, shared_data: Path) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(
        '{"query": "a", "positive": "b"}\n{"query": "c", "answer": "d"}\n', encoding="utf-8"
    )
    with pytest.raises(SourceError, match=r"pairs\.jsonl:2: field 'positive' is missing"):
        read_local(bad, "train", Columns())
    with pytest.raises(SourceError, match="no such file or folder"):
        read_local(tmp_path / "nope", "train", Columns())
    with pytest.raises(SourceError, match=r"no qrels for split 'dev' \(found: test, train\)"):
        read_local(shared_data / "SciFact", "dev", Columns())
    with pytest.raises(SourceError, match="neither a BEIR folder"):
        read_local(tmp_path, "train", Columns())


@pytest.mark.faults
def test_config_errors_name_file_and_field(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(MineError, match=r"mine\.yaml: sources\.0\.colour: Extra inputs"):
        load_config_text(tmp_path, "sources: [{path: x, colour: red}]")
    with pytest.raises(
        MineError, match=r"mine\.yaml: bands: .*level 2 band \[5, 20\] must start after rank 10"
    ):
        load_config_text(
            tmp_path, "bands: [[1, 10], [5, 20], [21, 30], [31, 40]]\nsources: [{path: x}]"
        )
    with pytest.raises(MineError, match=r"sources\.0: .*exactly one of 'path'"):
        load_config_text(tmp_path, "sources: [{path: x, hf: y}]")
    monkeypatch.delenv("NM_TEST_UNSET", raising=False)
    with pytest.raises(
        MineError, match=r"data_root: environment variable NM_TEST_UNSET is not set"
    ):
        load_config_text(tmp_path, "data_root: ${NM_TEST_UNSET}\nsources: [{path: x}]")
    with pytest.raises(MineError, match=r"data_root .* is not a folder"):
        load_config_text(tmp_path, "data_root: ${NM_TEST_UNSET:-missing}\nsources: [{path: x}]")
    monkeypatch.setenv("NM_TEST_ROOT", str(tmp_path))
    config = load_config_text(tmp_path, "data_root: ${NM_TEST_ROOT}\nsources: [{path: some.jsonl}]")
    assert config.sources[0].path == str(tmp_path.resolve() / "some.jsonl")


def test_committed_configs_load(shared_data: Path, monkeypatch) -> None:
    monkeypatch.setenv("NM_SHARED_DATA", str(shared_data))
    root = Path(__file__).resolve().parents[1]
    shared = load_config(root / "synth" / "data" / "mine-shared.yaml")
    assert [Path(s.path).name for s in shared.sources] == ["SNLI-triplets", "WikiQA", "SciFact"]
    smoke = load_config(root / "experiments" / "corpora" / "smoke-mine.yaml")
    assert smoke.sources[0].max_rows == 600


@pytest.mark.faults
def test_hub_source_fails_fast_offline_and_unreachable(monkeypatch) -> None:
    started = time.monotonic()
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set"):
        read_hub("sentence-transformers/all-nli", "triplet", "train", Columns())
    # Not marked offline, Hub unreachable: a closed local port stands in for the unreachable Hub.
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(SourceError, match="is unreachable"):
        read_hub("sentence-transformers/all-nli", "triplet", "train", Columns())
    assert time.monotonic() - started < 30


def test_manifest_is_json_serializable_and_counts_levels(mined: Path) -> None:
    manifest = json.loads((mined / "manifest.json").read_text())
    assert manifest["counts"]["negatives_per_level"] == dict.fromkeys(NEG_COLUMNS, 240)


def test_a_level_the_pool_cannot_fill_is_warned_and_recorded(
    tmp_path: Path, shared_data: Path
) -> None:
    """Mining 40 pairs left level 4 (ranks 101-300 of a ~80-text pool) empty without a word."""
    import io

    from rich.console import Console

    from synth.audit import audit_corpus

    out = io.StringIO()
    config = config_from_sources(
        [str(shared_data / "SNLI-triplets" / "train.jsonl")], max_rows=40, seed=0
    )
    corpus = mine(config, tmp_path / "small", progress=False, console=Console(file=out, width=200))
    (source,) = corpus.manifest["build"]["sources"]
    assert (
        source["missing_per_level"]["neg_4"] == 40 and source["negatives_per_level"]["neg_4"] == 0
    )
    assert "warning: level 4: 40 of 40 pairs have no negative (ranks 101-300" in out.getvalue()
    report = audit_corpus(tmp_path / "small", progress=False)
    assert "4" not in report["levels"]  # an empty level is not averaged
    partial = [lv for lv, n in source["missing_per_level"].items() if 0 < n < 40]
    md = (tmp_path / "small" / "audit.md").read_text()
    for col in partial:
        assert f"| level {col[-1]} | {40 - source['missing_per_level'][col]} of 40 |" in md
