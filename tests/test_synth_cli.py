"""The `synth` command line: real commands in-process (CliRunner), one real subprocess for the
no-traceback contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synth.cli import app
from synth.corpus import read_corpus

runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "mine" in result.output and "audit" in result.output


def test_mine_then_audit(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "mined"
    result = runner.invoke(
        app,
        [
            "mine",
            "--source",
            str(shared_data / "SNLI-triplets"),
            "--task-kind",
            "symmetric",
            "--max-rows",
            "50",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    corpus = read_corpus(out)
    assert len(corpus) == 50 and set(corpus.frame["task_kind"]) == {"symmetric"}
    # a 50-row pool is too small for the default level-4 band (ranks 101-300)
    assert corpus.manifest["counts"]["negatives_per_level"]["neg_4"] == 0

    result = runner.invoke(app, ["audit", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "level 3" in result.output and (out / "audit.json").is_file()


@pytest.mark.faults
def test_user_errors_exit_2_with_one_line(tmp_path: Path, tally) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("sources: [{path: x}]\nbandz: []\n", encoding="utf-8")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "q", "positive": "p"}\n', encoding="utf-8")
    a_file = tmp_path / "taken.txt"
    a_file.write_text("not a folder", encoding="utf-8")
    cases = [
        (
            ["mine", "--source", str(pairs), "--out", str(a_file)],
            "taken.txt is a file, not a folder",
        ),
        (
            ["mine", "--source", str(pairs), "--out", str(a_file / "sub")],
            "taken.txt is a file, not a folder",
        ),
        (
            ["mine", str(config), "--out", str(tmp_path / "o")],
            "mine.yaml: bandz: Extra inputs are not permitted",
        ),
        (
            ["mine", "--source", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
            "no such file or folder",
        ),
        (["mine", str(config), "--source", "x", "--out", str(tmp_path / "o")], "not both"),
        (["audit", str(tmp_path / "nope")], "corpus directory does not exist"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    tally(cases=len(cases))


@pytest.mark.faults
def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "synth.cli", "audit", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_quiet_logs_hide_rays_token_auth_notice() -> None:
    """Every sweep printed Ray's "Token authentication is enabled ..." warning (auth stays on)."""
    import subprocess
    import sys

    code = (
        "from harness.logs import quiet_logs; quiet_logs()\n"
        "import ray; ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False); ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Token authentication" not in done.stdout + done.stderr
