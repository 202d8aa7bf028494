"""Everything restored, reused or exported is checked first: a saved model's adapter files against
the sha256s its ``embedder.json`` recorded and for finite weights (``harness export``, ``harness
eval``, a trial reusing its finished training), and an MNTP adapter against the completion record
in its ``mntp.json`` and the file's recipe. A damaged one is rebuilt where the folder is the
harness's own, else refused in one line; real small packaged models throughout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO
from faults_util import assert_clean_failure
from safetensors.torch import load_file, save_file
from sweep_util import write_experiment
from typer.testing import CliRunner

from harness.cli import app
from harness.config import ModelSettings
from harness.embedder import FILES_KEY, META_FILE, Embedder, SavedModelError, check_saved
from harness.weights import file_hashes

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_torch_thread")]
runner = CliRunner()
MINILM = "packaged:all-minilm-l6-v2"
WEIGHTS = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """MiniLM with a LoRA whose B matrices are not zero, saved as `harness train` saves."""
    torch.manual_seed(0)
    settings = ModelSettings(
        name=MINILM, pooling="mean", lora={"r": 4, "alpha": 8, "dropout": 0.0}, dtype="float32"
    )
    emb = Embedder.from_settings(settings, "cpu", lora=True, name="t/reuse")
    with torch.no_grad():
        for name, p in emb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return emb.save(tmp_path_factory.mktemp("saved") / "model", steps=2)


# ---- ways to damage a saved model (each names the file a refusal must name)


def _rerecord(model: Path) -> None:
    """Record the files as they are now (a model saved that way)."""
    meta = json.loads((model / META_FILE).read_text())
    files = [p for p in (model / "adapter").rglob("*") if p.is_file()]
    meta[FILES_KEY] = file_hashes(model, files)
    (model / META_FILE).write_text(json.dumps(meta))


def _unrecord(model: Path) -> None:
    """Drop the record (a model saved before hashes were recorded)."""
    meta = json.loads((model / META_FILE).read_text())
    del meta[FILES_KEY]
    (model / META_FILE).write_text(json.dumps(meta))


def _truncate(model: Path) -> None:
    f = model / WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(model: Path) -> None:  # one byte of a weight: still loads, only the hash sees it
    f = model / WEIGHTS
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))


def _nan(model: Path) -> None:
    f = model / WEIGHTS
    tensors = load_file(f)
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, f, metadata={"format": "pt"})


def _missing(model: Path) -> None:
    (model / WEIGHTS).unlink()


def _meta_cut(model: Path) -> None:
    f = model / META_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "adapter_model.safetensors"),
    "byte-flipped": (_flip, "adapter_model.safetensors"),
    "nan": (_nan, "adapter_model.safetensors"),
    "nan-saved-so": (lambda m: (_nan(m), _rerecord(m)), "not finite"),
    "nan-no-record": (lambda m: (_nan(m), _unrecord(m)), "not finite"),
    "truncated-no-record": (lambda m: (_truncate(m), _unrecord(m)), "cannot be read"),
    "missing": (_missing, "missing"),
    "embedder-json-cut": (_meta_cut, "embedder.json"),
}


def _damaged(saved: Path, tmp_path: Path, damage: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(saved, model)
    DAMAGES[damage][0](model)
    return model


def test_a_saved_model_records_its_files_and_passes_its_check(saved, tmp_path, tally):
    meta = check_saved(saved)
    assert set(meta[FILES_KEY]) >= {WEIGHTS, "adapter/adapter_config.json"}
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(saved), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "modules.json").is_file()
    tally(cases=1)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_export_refuses_a_damaged_model_in_one_line(saved, tmp_path, damage, tally):
    model = _damaged(saved, tmp_path, damage)
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(model), "--out", str(out)])
    assert_clean_failure(result.exit_code, result.output, DAMAGES[damage][1])
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
    assert not out.exists()
    tally(cases=1, faults=1)


@pytest.mark.parametrize("damage", ["byte-flipped", "nan", "nan-no-record", "embedder-json-cut"])
def test_eval_refuses_a_damaged_model_in_one_line(saved, tmp_path, damage, shared_data, tally):
    model = _damaged(saved, tmp_path, damage)
    task = tmp_path / "BIOSSES"
    task.mkdir()
    lines = (shared_data / "BIOSSES" / "test.tsv").read_text(encoding="utf-8").splitlines()[:11]
    (task / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = runner.invoke(
        app, ["eval", str(model), "--tasks", str(task), "--output-dir", str(tmp_path / "eval")]
    )
    assert_clean_failure(result.exit_code, result.output, DAMAGES[damage][1])
    with pytest.raises(SavedModelError):
        Embedder.load(model, "cpu")
    tally(cases=2, faults=1)


# ---- a trial's finished training (trained.json), reused by a later attempt


@pytest.fixture(scope="module")
def finished_trial(tmp_path_factory, tiny_corpus_dir):
    """A real 3-step MiniLM trial whose training finished (trained.json beside its model)."""
    from harness.experiment_file import load_experiment
    from harness.trial import TRAINED_FILE, TrialContext, train_and_evaluate
    from synth.corpus import read_corpus

    root = tmp_path_factory.mktemp("trial")
    exp_file = write_experiment(
        root,
        tiny_corpus_dir,
        "reuse",
        model={
            "name": MINILM,
            "pooling": "mean",
            "lora": {"r": 4, "dropout": 0.0},
            "max_query_length": 24,
            "max_doc_length": 24,
        },
        train={"steps": 3, "batch_size": 8, "heldout_size": 16, "device": "cpu"},
        eval={"enabled": False},
    )
    corpus = read_corpus(tiny_corpus_dir)

    def attempt(workdir: Path) -> tuple[object, list[int], list[str]]:
        steps: list[int] = []
        notes: list[str] = []
        ctx = TrialContext(
            "cell", "k" * 16, workdir, lambda s, m: steps.append(s), say=notes.append
        )
        return train_and_evaluate(load_experiment(exp_file), corpus, ctx), steps, notes

    workdir = root / "first"
    workdir.mkdir()
    output, _, _ = attempt(workdir)
    assert (workdir / TRAINED_FILE).is_file() and "harness.reused_training" not in output.tags
    return workdir, attempt


def _trained_json_cut(workdir: Path) -> None:
    f = workdir / "trained.json"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _embedder_json_replaced(workdir: Path) -> None:  # NaN, and a description without a record
    _nan(workdir / "model")
    _unrecord(workdir / "model")


TRIAL_DAMAGES: dict[str, Callable[[Path], None]] = {
    "adapter-truncated": lambda w: _truncate(w / "model"),
    "adapter-nan-saved-so": lambda w: (_nan(w / "model"), _rerecord(w / "model")),
    "embedder-json-replaced": _embedder_json_replaced,
    "trained-json-cut": _trained_json_cut,
}


def _copy_trial(src: Path, dst: Path) -> Path:
    """The trial folder elsewhere, trained.json pointing at the copied model."""
    shutil.copytree(src, dst)
    record = json.loads((dst / "trained.json").read_text())
    record["model_dir"] = str((dst / "model").resolve())
    (dst / "trained.json").write_text(json.dumps(record))
    return dst


def test_an_intact_finished_training_is_reused(finished_trial, tmp_path, tally):
    first, attempt = finished_trial
    output, steps, _ = attempt(_copy_trial(first, tmp_path / "trial"))
    assert "harness.reused_training" in output.tags and steps  # the curve replayed
    tally(cases=1, trials=1)


@pytest.mark.parametrize("damage", list(TRIAL_DAMAGES))
def test_a_damaged_finished_training_is_trained_again(finished_trial, tmp_path, damage, tally):
    """The trial's folder is its own: a finished training whose model fails its check is not
    reused (nor does it fail every later attempt); the trial trains again, saying why."""
    first, attempt = finished_trial
    workdir = _copy_trial(first, tmp_path / "trial")
    TRIAL_DAMAGES[damage](workdir)
    output, steps, notes = attempt(workdir)
    assert "harness.reused_training" not in output.tags, notes
    assert any("training again" in n for n in notes), notes
    assert min(steps) <= 1  # trained from the start
    check_saved(workdir / "model")  # and the model it left is whole
    tally(cases=1, faults=1, trials=1)


# ---- an MNTP adapter (mntp.output), reused by a sweep or `harness mntp`

MNTP = {"steps": 2, "batch_size": 4, "max_length": 32, "eval_blocks": 4}


def _mntp_file(root: Path, corpus: Path, name: str, output: Path, text: Path, **mntp) -> Path:
    return write_experiment(
        root,
        corpus,
        name,
        model={
            "attention": "bidirectional",
            "template": "llm2vec",
            "init_adapter": str(output),
            "dtype": "float32",
        },
        mntp={"text": [str(text)], "output": str(output), **MNTP, **mntp},
        eval={"enabled": False},
    )


@pytest.fixture(scope="module")
def mntp_text(tmp_path_factory, shared_data) -> Path:
    lines = (shared_data / "STSBenchmark" / "train.tsv").read_text(encoding="utf-8").splitlines()
    text = tmp_path_factory.mktemp("mntp-text") / "text.txt"
    text.write_text("\n".join(line.split("\t")[0] for line in lines[1:81]), encoding="utf-8")
    return text


@pytest.fixture(scope="module")
def built_mntp(tmp_path_factory, tiny_corpus_dir, mntp_text, smollm2_dir) -> Path:
    """A real 2-step MNTP adapter of the packaged SmolLM2, built by `harness mntp`."""
    from harness.experiment_file import load_experiment
    from harness.mntp import run_mntp

    root = tmp_path_factory.mktemp("mntp")
    exp = load_experiment(_mntp_file(root, tiny_corpus_dir, "m", root / "adapter", mntp_text))
    assert run_mntp(exp, None, track=False, progress=False, say=lambda _: None) is not None
    return root / "adapter"


def _prepare(exp_file: Path) -> tuple[object, list[str], list[str]]:
    """The sweep's pre-flight for the file's init adapter (a real MNTP build when it builds)."""
    from harness.experiment_file import load_experiment
    from harness.init_adapter import prepare_init_adapter
    from harness.mntp import run_mntp

    exp = load_experiment(exp_file)
    builds: list[str] = []
    notes: list[str] = []

    def build(e, folder: Path) -> None:
        builds.append(str(folder))
        run_mntp(e, None, output=folder, track=False, progress=False, say=notes.append)

    prepare_init_adapter(exp, build=build, say=notes.append)
    return exp, builds, notes


def _weights_cut(adapter: Path) -> None:
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _weights_nan_recorded(adapter: Path) -> None:
    from harness.weights import file_hashes

    f = adapter / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    save_file(tensors, f, metadata={"format": "pt"})
    meta = json.loads((adapter / "mntp.json").read_text())
    meta["files"] = file_hashes(adapter, [p for p in adapter.iterdir() if p.name != "mntp.json"])
    (adapter / "mntp.json").write_text(json.dumps(meta))


def _record_dropped(adapter: Path) -> None:  # killed before the record (or built before records)
    meta = json.loads((adapter / "mntp.json").read_text())
    del meta["files"]
    (adapter / "mntp.json").write_text(json.dumps(meta))


def _other_settings(adapter: Path) -> None:
    meta = json.loads((adapter / "mntp.json").read_text())
    meta["settings"]["lr"] = 0.5
    (adapter / "mntp.json").write_text(json.dumps(meta))


OURS: dict[str, Callable[[Path], None]] = {
    "weights-cut-short": _weights_cut,
    "weights-nan-recorded": _weights_nan_recorded,
    "no-completion-record": _record_dropped,
    "other-settings": _other_settings,
}


@pytest.mark.parametrize("damage", list(OURS))
def test_a_damaged_mntp_adapter_of_our_own_is_rebuilt(
    built_mntp, tmp_path, tiny_corpus_dir, mntp_text, damage, tally
):
    """An adapter `harness mntp` wrote (its mntp.json) that is cut short, not finite, without its
    completion record or of other settings than the file's is trained again, not used."""
    from harness.init_adapter import mntp_state

    adapter = tmp_path / "adapter"
    shutil.copytree(built_mntp, adapter)
    OURS[damage](adapter)
    exp, builds, notes = _prepare(_mntp_file(tmp_path, tiny_corpus_dir, "m", adapter, mntp_text))
    assert builds == [str(adapter.resolve())], notes
    assert any("training it again" in n for n in notes), notes
    assert mntp_state(exp, adapter).ready
    assert exp.model.init_adapter_recipe is not None  # keyed by its recipe, as before
    tally(cases=1, faults=1)


def _no_meta(adapter: Path) -> None:  # an adapter put there by hand (or another tool)
    (adapter / "mntp.json").unlink()


def _meta_garbled(adapter: Path) -> None:
    (adapter / "mntp.json").write_bytes(b"\x00{not json")


@pytest.mark.parametrize("damage", [_no_meta, _meta_garbled], ids=["no-mntp-json", "garbled"])
def test_an_mntp_output_that_is_not_ours_is_refused_and_left_alone(
    built_mntp, tmp_path, tiny_corpus_dir, mntp_text, damage, tally
):
    """Nothing proves such a folder is harness mntp's: the sweep's pre-flight and `harness mntp`
    refuse it in one line and leave every byte as it was."""
    from harness.config import ConfigError

    adapter = tmp_path / "adapter"
    shutil.copytree(built_mntp, adapter)
    damage(adapter)
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    exp_file = _mntp_file(tmp_path, tiny_corpus_dir, "m", adapter, mntp_text)
    with pytest.raises(ConfigError, match="left alone"):
        _prepare(exp_file)
    result = runner.invoke(app, ["mntp", str(exp_file), "--no-track"])
    assert_clean_failure(result.exit_code, result.output, str(adapter), "left alone")
    result = runner.invoke(app, ["mntp", str(exp_file), "--no-track", "--force"])
    assert_clean_failure(result.exit_code, result.output, "left alone")
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    tally(cases=3, faults=1)


CONCURRENT = """
import sys
from pathlib import Path
from harness.experiment_file import load_experiment
from harness.init_adapter import prepare_init_adapter
from harness.mntp import run_mntp

exp = load_experiment(sys.argv[1])

def build(e, folder):
    print("BUILD", flush=True)
    run_mntp(e, None, output=folder, track=False, progress=False, say=lambda _: None)

prepare_init_adapter(exp, build=build, say=lambda line: print(line, flush=True))
print("SHA", exp.model.init_adapter_sha256, flush=True)
"""


def test_two_files_sharing_a_missing_mntp_output_build_it_once(
    tmp_path, tiny_corpus_dir, mntp_text, smollm2_dir, tally
):
    """Two experiment files (two sweeps: two store locks) with one missing mntp.output: the
    second waits for the first's build and uses it, instead of training into it at the same time."""

    adapter = tmp_path / "shared-adapter"
    files = [_mntp_file(tmp_path, tiny_corpus_dir, name, adapter, mntp_text) for name in ("a", "b")]
    script = tmp_path / "prepare.py"
    script.write_text(CONCURRENT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # see one_torch_thread
    first = subprocess.Popen(
        [sys.executable, str(script), str(files[0])], stdout=subprocess.PIPE, text=True, env=env
    )
    assert first.stdout.readline().strip() == "BUILD"  # the first one is training now
    second = subprocess.run(
        [sys.executable, str(script), str(files[1])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    out_first = first.communicate(timeout=300)[0]
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    assert "BUILD" not in second.stdout, second.stdout
    assert "waiting for the MNTP adapter" in second.stdout, second.stdout
    sha = {
        line.split()[1]
        for line in (out_first + second.stdout).splitlines()
        if line.startswith("SHA")
    }
    assert len(sha) == 1 and len(sha.pop()) == 64
    tally(cases=1, faults=1)
