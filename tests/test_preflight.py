"""`harness check` checks everything a sweep would fail on, and reports every problem: a grid
value, the model, the init adapter, the evaluation tasks and the corpus (harness/preflight.py)."""

from __future__ import annotations

from pathlib import Path

from sweep_util import write_experiment
from typer.testing import CliRunner

from harness.cli import app

runner = CliRunner()


def test_check_reports_every_problem_and_never_says_valid_when_a_sweep_would_fail(
    tmp_path: Path, monkeypatch
) -> None:
    """A Hub model that is not cached (offline), a missing corpus with no corpus.build, a missing
    task folder and a bad grid value: four lines, exit 2, no "valid" (fails before: `check` stopped
    at the grid value, and without it printed "valid" for the model and the corpus, on which the
    sweep failed seconds later)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exp = write_experiment(
        tmp_path,
        tmp_path / "no-corpus",
        "broken",
        model={"name": "someorg/not-a-cached-model"},
        eval={"tasks": [str(tmp_path / "no-such-task")]},
        grid={"model.pooling": ["eos", "meen"]},
    )
    result = runner.invoke(app, ["check", str(exp)])
    out = " ".join(result.output.split())
    assert result.exit_code == 2, out
    assert "valid;" not in out and "not valid (4 problems above)" in out
    assert "error (grid)" in out and "'meen'" in out
    assert "error (model)" in out and "someorg/not-a-cached-model: not in the local Hugging" in out
    assert "error (evaluation)" in out and "no-such-task" in out
    assert (
        "error (corpus)" in out and "no-corpus does not exist and there is no corpus.build" in out
    )
    assert "Traceback" not in out


def test_check_passes_a_runnable_file(tmp_path: Path, tiny_corpus_dir: Path, shared_data) -> None:
    """The packaged model (found by its package, not converted), a corpus that is there, a local
    task folder: valid, with the trials listed."""
    exp = write_experiment(
        tmp_path,
        tiny_corpus_dir,
        "fine",
        model={"name": "packaged:smollm2-135m-instruct"},
        eval={"tasks": [str(shared_data / "BIOSSES")]},
        grid={"model.pooling": ["eos", "mean"]},
    )
    result = runner.invoke(app, ["check", str(exp)])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, out
    assert "valid; experiment 'fine', 2 trial(s)" in out and "eos" in out and "mean" in out
    assert "error" not in out
