"""The tracebacks of issue 31 (class 6), each now one `error:` line naming what and where, exit 2:
a garbled or truncated SQLite store under `harness tables`, an output that is a file, a trained
adapter cut short or not matching its model, out-of-range merge seeds and verify batch sizes, an
output folder nothing can be created in. Every case runs the real CLI in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from faults_util import assert_clean_failure

pytestmark = pytest.mark.faults
CLI = {
    "harness": [sys.executable, "-c", "from harness.cli import app; app()"],
    "synth": [sys.executable, "-c", "from synth.cli import app; app()"],
}
MINILM = "packaged:all-minilm-l6-v2"


def run_cli(tool: str, *args: str | Path) -> tuple[int, str]:
    done = subprocess.run(
        [*CLI[tool], *map(str, args)], capture_output=True, text=True, timeout=300
    )
    return done.returncode, done.stdout + done.stderr


def _store(path: Path) -> Path:
    """A real MLflow SQLite store holding one experiment."""
    from harness.config import TrackingSettings
    from harness.tracking import Tracker

    Tracker(TrackingSettings(uri=f"sqlite:///{path}"), "exp")
    return path


def _garble_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    third = len(data) // 3
    data[third : third + 40_000] = bytes((b * 7 + 13) % 256 for b in data[third : third + 40_000])
    path.write_bytes(bytes(data))


STORE_CASES = {
    "truncated to half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbled past the header": _garble_middle,
    "not a database": lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\x07" * 5000),
}


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_tables_on_a_broken_store_is_one_line(case: str, tmp_path: Path, tally: Any) -> None:
    store = _store(tmp_path / "mlflow.db")
    STORE_CASES[case](store)
    before = store.read_bytes()
    code, out = run_cli(
        "harness", "tables", "--experiment", "exp", "--tracking-uri", f"sqlite:///{store}"
    )
    assert_clean_failure(code, out, str(store), "not a readable SQLite MLflow store")
    assert store.read_bytes() == before, "the broken store was changed"
    tally(cases=1, faults=1)


def test_an_output_that_is_a_file_is_one_line(
    tmp_path: Path, tiny_corpus_dir: Path, tally: Any
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    store = _store(tmp_path / "mlflow.db")
    cases = [
        (
            ["tables", "--experiment", "exp", "--tracking-uri", f"sqlite:///{store}"],
            ["--output", afile],
        ),
        (["audit", tiny_corpus_dir, MINILM], ["--out", afile / "sub"]),
        (["export", tmp_path / "no-model"], ["--out", afile]),
    ]
    for args, output in cases:
        code, out = run_cli("harness", *args, *output)
        assert_clean_failure(code, out, f"{afile} is a file, not a folder")
    assert afile.read_text() == "mine\n"
    tally(cases=len(cases), faults=len(cases))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved MiniLM with a LoRA adapter (small: loads in seconds)."""
    from harness.config import ModelSettings
    from harness.embedder import Embedder

    settings = ModelSettings(
        name=MINILM, pooling="mean", attention="native", template="e5", dtype="float32",
        lora={"r": 4, "alpha": 8, "dropout": 0.0}, max_query_length=24, max_doc_length=32,
    )  # fmt: skip
    emb = Embedder.from_settings(settings, "cpu", lora=True, name="t/minilm")
    return emb.save(tmp_path_factory.mktemp("saved") / "model", corpus_sha256="ab" * 32, steps=1)


def _cut(adapter: Path) -> None:
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _config(**changes: Any):
    def edit(adapter: Path) -> None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **changes}))

    return edit


ADAPTER_CASES = {  # the finite-weights check reads a cut file before peft does
    "truncated weights": (_cut, ("cannot be read", "incomplete metadata")),
    "another rank": (_config(r=8), ("cannot load the adapter", "size mismatch")),
    "modules the model lacks": (
        _config(target_modules=["no_such_proj"]),
        ("cannot load the adapter", "no_such_proj"),
    ),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_a_broken_or_mismatched_adapter_is_one_line(
    case: str, saved_model: Path, tmp_path: Path, tally: Any
) -> None:
    """The loading itself fails in one line. With its files' hashes recorded (embedder.json) a
    changed adapter is refused before it loads (tests/test_faults_reuse.py), so the record is
    dropped here, as in a model saved before records existed."""
    from harness.embedder import FILES_KEY, META_FILE

    edit, fragments = ADAPTER_CASES[case]
    model = tmp_path / "model"
    shutil.copytree(saved_model, model)
    edit(model / "adapter")
    meta = json.loads((model / META_FILE).read_text())
    (model / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != FILES_KEY}))
    code, out = run_cli("harness", "export", model, "--out", tmp_path / "out")
    assert_clean_failure(code, out, str(model / "adapter"), *fragments)
    assert not (tmp_path / "out").exists()
    tally(cases=1, faults=1)


def test_synth_seeds_batch_sizes_and_unwritable_outputs_are_one_line(
    tmp_path: Path, tiny_corpus_dir: Path, tally: Any
) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_corpus_dir, other)
    parts = [tiny_corpus_dir, other]
    cases = [
        (["merge", *parts, "--out", tmp_path / "m", "-w", "other=0.5", "--seed", "-1"], ["--seed -1"]),
        (["merge", *parts, "--out", tmp_path / "m", "-w", "other=0.5", "--seed", str(2**70)], ["--seed"]),
        (["merge", *parts, "--out", "/sys/nm-no-such/out"], ["cannot write in /sys"]),
        (["verify", tiny_corpus_dir, "--out", tmp_path / "v", "--batch-size", "0"], ["--batch-size 0"]),
        (["verify", tiny_corpus_dir, "--out", tmp_path / "v", "--batch-size", "-3"], ["--batch-size -3"]),
    ]  # fmt: skip
    if not Path("/sys").is_dir():  # a system without sysfs: no folder refuses root's writes
        cases = [c for c in cases if "/sys/nm-no-such/out" not in c[0]]
    for args, fragments in cases:
        code, out = run_cli("synth", *args)
        assert_clean_failure(code, out, *fragments)
    assert not (tmp_path / "m").exists() and not (tmp_path / "v").exists()
    tally(cases=len(cases), faults=len(cases))
