"""`harness export`: a saved model (or a run's) as a sentence-transformers folder that loads in
one call and embeds as the harness does; its MLflow model; the tags that say where models are."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from harness.config import ModelSettings, TrackingSettings
from harness.embedder import Embedder
from harness.export import ExportError, default_prompts, export_model, portable_config

TEXTS = [
    "A dog runs through the park after a red ball.",
    "Two people talk about the weather in a small cafe near the station, while the rain keeps "
    "falling on the windows and the waiter brings more coffee to every table.",  # cut at 24 tokens
    "x",
]
QUERY_INSTRUCTION = default_prompts()[0]  # the `query` prompt's
INSTRUCTION = "Retrieve semantically similar text."  # the `STS` prompt's
TOLERANCE = 1e-5  # fp32 on the CPU, the adapter kept apart: the same arithmetic as the harness
# merged weights round differently (W + s·BA once, not x·W + s·(x·A)·B per input): the difference
# grows through the layers to ~1e-4 of values up to ~40, so a merge is checked relative to the scale
MERGED_TOLERANCE = 1e-5  # of the largest |value|
SMOLLM2, MINILM = "packaged:smollm2-135m-instruct", "packaged:all-minilm-l6-v2"
CASES = {  # model, pooling, attention, template: the paper's backbone (bidirectional), both
    # formats, and an encoder
    "eos-causal-e5": (SMOLLM2, "eos", "causal", "e5"),
    "mean-bidirectional-llm2vec": (SMOLLM2, "mean", "bidirectional", "llm2vec"),
    "ata-bidirectional-e5": (SMOLLM2, "ata", "bidirectional", "e5"),
    "ata-minilm-encoder": (MINILM, "ata", "native", "e5"),
}
CORPUS_SHA = "ab" * 32
HARNESS: dict[str, Embedder] = {}  # the saved models as the harness embeds with them, by case
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _settings(name: str, pooling: str, attention: str, template: str) -> ModelSettings:
    return ModelSettings(
        name=name,
        pooling=pooling,
        attention=attention,
        template=template,
        dtype="float32",
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        max_query_length=24,
        max_doc_length=32,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One saved model per case: SmolLM2 with a LoRA whose B matrices are not zero (an untrained
    LoRA would change nothing, and a merge would be trivially exact)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    HARNESS.clear()
    for name, case in CASES.items():
        torch.manual_seed(0)
        emb = Embedder.from_settings(_settings(*case), "cpu", lora=True, name=f"t/{name}")
        with torch.no_grad():
            for param_name, p in emb.model.named_parameters():
                if "lora_B" in param_name:
                    p.normal_(0, 0.05)
        out[name] = emb.save(
            root / name, corpus_sha256=CORPUS_SHA, steps=2, level_order=[4, 2], train={"steps": 2}
        )
        HARNESS[name] = emb.eval()
    return out


def _max_diff(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def _load(folder: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")


def _check_same_vectors(
    harness: Embedder, st, label: str, relative: bool = False
) -> dict[str, float]:
    """Queries (the `query` prompt), documents, another instruction: harness vs export; the
    largest absolute difference (``relative``: over the largest absolute value)."""
    reference = harness.encode(TEXTS, instruction=INSTRUCTION)
    scale = float(reference.abs().max()) if relative else 1.0
    diffs = {
        "query": _max_diff(
            st.encode_query(TEXTS, convert_to_tensor=True),
            harness.encode(TEXTS, instruction=QUERY_INSTRUCTION),
        ),
        "document": _max_diff(
            st.encode_document(TEXTS, convert_to_tensor=True), harness.encode(TEXTS)
        ),
        "instruction": _max_diff(
            st.encode(TEXTS, instruction=INSTRUCTION, convert_to_tensor=True),
            harness.encode(TEXTS, instruction=INSTRUCTION),
        ),
    }
    diffs = {k: v / scale for k, v in diffs.items()}
    print(f"{label}: max {'relative' if relative else 'absolute'} difference {diffs}")
    assert max(diffs.values()) <= (MERGED_TOLERANCE if relative else TOLERANCE), (label, diffs)
    return diffs


@pytest.mark.parametrize("case", list(CASES))
def test_exported_folder_loads_in_one_call_and_embeds_as_the_harness(saved, tmp_path, case):
    t0 = time.perf_counter()
    result = export_model(str(saved[case]), tmp_path / "st", device="cpu")
    assert result.folder == tmp_path / "st" and not result.merged
    harness = HARNESS[case]
    st = _load(result.folder)
    _check_same_vectors(harness, st, case)
    assert st.get_embedding_dimension() == harness.dimension and st.similarity_fn_name == "cosine"

    # the query prompt is the template's opening with the instruction: a literal prefix
    prompt = st.prompts["query"]
    assert QUERY_INSTRUCTION in prompt and st.prompts["document"] == ""
    assert harness.format("T", QUERY_INSTRUCTION)[0].startswith(prompt)
    assert harness.format("T", INSTRUCTION)[0].startswith(st.prompts["STS"])  # mteb's look-up
    files = {p.name for p in result.folder.iterdir()}
    assert {"modules.json", "st_module.py", "inputs.py", "pooling.py", "adapter"} <= files
    print(f"{case}: export + load + encode in {time.perf_counter() - t0:.1f} s")


def test_a_merged_export_needs_no_peft_and_names_no_local_path(saved, tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app

    case = "ata-bidirectional-e5"
    out = tmp_path / "merged"
    cli = CliRunner().invoke(app, ["export", str(saved[case]), "--out", str(out), "--merge"])
    assert cli.exit_code == 0, cli.output
    assert "LoRA merged" in cli.output and "trust_remote_code=True" in cli.output
    assert not (out / "adapter").exists()
    config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert "peft" not in config["requirements"]
    _check_same_vectors(HARNESS[case], _load(out), f"{case} merged", True)

    # portable: no path of this machine in any text file, the base by its Hub id
    needles = ["/work/", str(Path.home()), str(tmp_path), str(saved[case])]
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".py", ".txt", ".jinja", ".yaml"):
            text = path.read_text(encoding="utf-8")
            assert not [n for n in needles if n in text], path
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert CORPUS_SHA in card and "trust_remote_code=True" in card and "`ata`" in card
    assert "Instruct: Given a query, retrieve documents that answer the query\\nQuery: " in card
    # the shipped code stands alone: it imports nothing of the harness
    for name in ("st_module.py", "inputs.py", "pooling.py"):
        tree = ast.parse((out / name).read_text())
        imported = {
            (n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        assert not imported & {"harness", "synth"}, (name, imported)

    # one-line errors: an occupied --out, a folder that is no saved model
    again = CliRunner().invoke(app, ["export", str(saved[case]), "--out", str(out)])
    assert again.exit_code == 2 and "--force replaces it" in again.output
    with pytest.raises(ExportError, match="not a folder saved by `harness train`"):
        export_model(str(tmp_path), tmp_path / "x")


def test_a_runs_export_carries_its_scores_and_logs_a_registrable_mlflow_model(saved, tmp_path):
    import mlflow
    import mlflow.pyfunc

    from harness.experiment_file import validate
    from harness.tracking import Tracker

    case = "mean-bidirectional-llm2vec"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = validate(
        {
            "name": "export",
            "corpus": {"path": str(tmp_path / "corpus")},
            "model": _settings(*CASES[case]).model_dump(mode="json"),
            "tracking": {"uri": uri},
        }
    )
    tracker = Tracker(exp.tracking, exp.name)
    run_id = tracker.start_trial_run(exp, parent_id=None, name="mean", key="k" * 16, cell={})
    tracker.log_metrics(run_id, {"eval/avg": 0.625, "heldout/recall_at_1": 0.5})
    tracker.log_artifacts(run_id, saved[case], "model")
    tracker.finish_trial(run_id)

    result = export_model(
        run_id, tmp_path / "st", tracking_uri=uri, register="nm-export-test", device="cpu"
    )
    card = (result.folder / "README.md").read_text()
    assert run_id in card and "| `eval/avg` | 0.6250 |" in card
    assert "<local>/corpus" in card and str(tmp_path) not in card  # the config, made portable

    # the MLflow model: linked to the run, registered, and its pyfunc embeds as the harness does
    assert result.model_id and result.version == "1"
    client = mlflow.MlflowClient(uri)
    assert client.get_logged_model(result.model_id).source_run_id == run_id
    assert client.get_model_version("nm-export-test", "1").run_id == run_id
    mlflow.set_tracking_uri(uri)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/nm-export-test/1")
    finally:
        mlflow.set_tracking_uri(None)
    harness = HARNESS[case]
    queries = pyfunc.predict(TEXTS, params={"prompt_name": "query"})
    documents = pyfunc.predict(TEXTS)
    assert _max_diff(queries, harness.encode(TEXTS, instruction=QUERY_INSTRUCTION)) <= TOLERANCE
    assert _max_diff(documents, harness.encode(TEXTS)) <= TOLERANCE
    assert type(pyfunc.get_raw_model()).__name__ == "SentenceTransformer"


def test_the_driver_logs_a_trials_mlflow_model_and_tags_where_its_model_is(tmp_path):
    """The sweep driver's part (no Ray, no real model): a trial's artifacts and MLflow model."""
    from harness.driver import SweepSummary, TrackingCallback, TrialRecord, print_summary
    from harness.mlflow_model import NAME, mlflow_model_folder
    from harness.tracking import MLFLOW_MODEL, MODEL_PATH, MODEL_URI, Tracker
    from harness.trial import ARTIFACTS, KIND, TAGS, pack_artifacts

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(TrackingSettings(uri=uri), "driver")
    run_id = tracker.start_trial(None, name="ata", params={}, tags={})
    model = tmp_path / "model"
    model.mkdir()
    (model / "embedder.json").write_text("{}")
    fake = tmp_path / "fake-st"  # an exported folder's shape is all the MLflow folder needs
    fake.mkdir()
    (fake / "config.json").write_text('{"hidden_size": 8}')
    st_model = mlflow_model_folder(fake, tmp_path / NAME)
    bundle, left_out = pack_artifacts({"model": model, NAME: st_model}, 2**20)
    assert not left_out

    out = Console(file=__import__("io").StringIO(), width=200)
    callback = TrackingCallback(tracker, "", None, "sha", {}, out)  # type: ignore[arg-type]
    callback.records["t1"] = TrialRecord("ata", "key", "RUNNING", run_id)
    trial = type("Trial", (), {"trial_id": "t1"})()
    tags = {MODEL_PATH: f"host:{model}"}
    callback.on_trial_result(
        0, [], trial, {KIND: "final", "eval/avg": 0.5, TAGS: tags, ARTIFACTS: bundle}
    )
    run = tracker.client.get_run(run_id)
    assert run.data.tags[MODEL_URI] == f"runs:/{run_id}/model"
    assert run.data.tags[MODEL_PATH] == f"host:{model}"
    model_id = run.data.tags[MLFLOW_MODEL].removeprefix("models:/")
    assert tracker.client.get_logged_model(model_id).source_run_id == run_id
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    assert "model" in {a.path for a in tracker.client.list_artifacts(run_id)}

    record = callback.records["t1"]
    record.status = "FINISHED"
    print_summary(out, SweepSummary("driver", uri, None, [record], 1.0, 1))
    assert f"model ata: runs:/{run_id}/model (host:{model})" in out.file.getvalue()


def test_portable_config_hides_local_paths():
    data = {
        "corpus": {"path": "/home/me/corpora/snli"},
        "model": {"name": "packaged:smollm2-135m-instruct", "init_adapter": "~/mntp/adapter"},
        "tracking": {"uri": "sqlite:////home/me/results/mlflow.db"},
        "eval": {"tasks": ["STS16", "./local/BIOSSES"]},
        "train": {"lr": 1e-4},
    }
    assert portable_config(data) == {
        "corpus": {"path": "<local>/snli"},
        "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "init_adapter": "<local>/adapter"},
        "tracking": {"uri": "<local store>"},
        "eval": {"tasks": ["STS16", "<local>/BIOSSES"]},
        "train": {"lr": 1e-4},
    }


def test_harness_eval_of_an_exported_folder_scores_the_trained_model(
    saved, tmp_path, shared_data, tiny_corpus_dir
):
    """`harness eval EXPORT_DIR` scores the exported model with its own pooling, attention,
    format and adapter, as on the folder it was exported from (fails before: the folder loaded as
    a plain base model, mean pooling, native attention, no LoRA, and scored another number with
    exit 0). `harness audit` needs the harness's model and refuses an export in one line."""
    from typer.testing import CliRunner

    from harness.cli import app
    from harness.evaluation.command import eval_command

    case = "ata-bidirectional-e5"
    out = tmp_path / "st"
    export_model(str(saved[case]), out, device="cpu")
    task = tmp_path / "tasks" / "BIOSSES"  # 24 real pairs in a folder mteb knows by its name
    task.mkdir(parents=True)
    lines = (shared_data / "BIOSSES" / "test.tsv").read_text(encoding="utf-8").splitlines()[:25]
    (task / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def score(model: str, where: str) -> float:
        result = eval_command(model, None, [str(task)], output_dir=str(tmp_path / where))
        return result.metrics["eval/BIOSSES"]

    trained, exported = score(str(saved[case]), "saved"), score(str(out), "export")
    # the fixture's LoRA is far from identity: loaded as a base model (mean pooling, native
    # attention, no LoRA) the export scored 60.86 where the trained model scores 18.64
    print(f"BIOSSES x100: trained {100 * trained:.2f}, export {100 * exported:.2f}")
    assert exported == pytest.approx(trained, abs=1e-6)

    audit = CliRunner().invoke(app, ["audit", str(tiny_corpus_dir), str(out)])
    assert audit.exit_code == 2 and "a `harness export` folder" in audit.output
