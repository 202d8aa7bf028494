"""`synth merge`: a generated corpus (the fake OpenAI-compatible server on loopback) and a mined one
(real MiniLM on real SNLI rows) become one corpus in the same contract, which a sweep trains on:
the README's paper recipe (generate, mine, merge, sweep), at toy size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sweep_standins
from sweep_util import write_experiment
from synth_servers import scripted, serve, synth_config_file
from typer.testing import CliRunner

from harness.sweep import run_sweep
from synth.cli import app
from synth.corpus import read_corpus
from synth.generate import generate
from synth.merge import MergeError, merge_corpora
from synth.mine import mine
from synth.mine_config import config_from_sources
from synth.synth_config import load_synth_config


@pytest.fixture(scope="module")
def parts(tmp_path_factory, shared_data) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("parts")
    with serve(scripted()) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("NM_TEST_KEY", "k")
        cfg = synth_config_file(
            tmp / "gen", endpoint={"base_url": url}, output=str(tmp / "synthetic")
        )
        assert generate(load_synth_config(cfg), progress=False).complete
    mined = config_from_sources(
        [str(shared_data / "SNLI-triplets")], task_kind="symmetric", max_rows=60, seed=1
    )
    mine(mined, tmp / "retrieval", progress=False)
    return tmp / "synthetic", tmp / "retrieval"


def test_merge_keeps_every_row_and_records_its_parts(parts, tmp_path) -> None:
    synthetic, retrieval = (read_corpus(p) for p in parts)
    out = tmp_path / "main"
    result = CliRunner().invoke(app, ["merge", *map(str, parts), "--out", str(out)])
    assert result.exit_code == 0, result.output
    merged = read_corpus(out)
    assert len(merged) == len(synthetic) + len(retrieval)
    assert set(merged.frame["source"]) == {"synthetic", *set(retrieval.frame["source"])}
    recorded = merged.manifest["build"]["parts"]
    assert [
        (p["name"], p["samples_sha256"], p["rows"], p["kept"], p["weight"]) for p in recorded
    ] == [
        ("synthetic", synthetic.sha256, len(synthetic), len(synthetic), 1.0),
        ("retrieval", retrieval.sha256, len(retrieval), len(retrieval), 1.0),
    ]
    assert [p["build_kind"] for p in recorded] == ["synthesis", "mine"]
    # the same parts give the same bytes (so the same trial keys); a weight changes them
    again = merge_corpora(parts, tmp_path / "again")
    assert again.sha256 == merged.sha256
    halved = merge_corpora(parts, tmp_path / "halved", weights={"retrieval": 0.5}, seed=3)
    assert len(halved) == len(synthetic) + round(0.5 * len(retrieval))
    assert halved.sha256 != merged.sha256
    assert (
        json.loads((tmp_path / "halved" / "manifest.json").read_text())["build"]["parts"][1][
            "weight"
        ]
        == 0.5
    )


def test_merge_input_errors_are_one_line(parts, tmp_path) -> None:
    with pytest.raises(MergeError, match="at least two"):
        merge_corpora(parts[:1], tmp_path / "x")
    with pytest.raises(
        MergeError, match=r"--weight names no part: nope \(parts: synthetic, retrieval\)"
    ):
        merge_corpora(parts, tmp_path / "x", weights={"nope": 0.5})
    result = CliRunner().invoke(
        app, ["merge", *map(str, parts), "--out", str(tmp_path / "x"), "--weight", "retrieval=2"]
    )
    assert result.exit_code == 2 and "expected PART=W with 0 < W <= 1" in result.output
    assert not (tmp_path / "x").exists()


def test_a_sweep_trains_on_the_merged_corpus(ray_instance, parts, tmp_path) -> None:
    merge_corpora(parts, tmp_path / "main")
    exp = write_experiment(
        tmp_path,
        tmp_path / "main",
        "merged",
        train={"steps": 2, "batch_size": 4, "heldout_size": 8},
    )
    summary = run_sweep(exp, [], trial_fn=sweep_standins.quick, results_dir=tmp_path / "results")
    assert [r.status for r in summary.records] == ["FINISHED"]
