"""The training loop on the real packaged SmolLM2: a few LoRA steps, save/load, GradCache, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from harness.embedder import Embedder
from harness.experiment_file import validate
from harness.schedules import build_schedule
from harness.train import StepRunner, train_one
from synth.corpus import read_corpus

TINY = {
    "model": {
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "max_query_length": 24,
        "max_doc_length": 24,
        "dtype": "float32",
    },
    "train": {
        "steps": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 0,
        "heldout_size": 8,
        "device": "cpu",
        "temperature": 0.05,
    },
}


def _exp(corpus_dir: Path, **over):
    data = {"name": "t", "corpus": {"path": str(corpus_dir)}, **json.loads(json.dumps(TINY))}
    for section, values in over.items():
        data.setdefault(section, {}).update(values)
    return validate(data)


def test_train_one_saves_a_model_that_reloads_identically(tiny_corpus_dir, tmp_path):
    corpus = read_corpus(tiny_corpus_dir)
    exp = _exp(tiny_corpus_dir, model={"pooling": "ata"}, train={"strategy": "curriculum"})
    seen: list[tuple[int, dict]] = []
    result = train_one(
        exp,
        corpus,
        output_dir=tmp_path,
        on_metrics=lambda s, m: seen.append((s, m)),
        progress=False,
        name="t/ata",
        revision="k1",
    )
    steps = [s for s, m in seen if "train/loss" in m]
    assert steps == [1, 2]
    assert all(
        m["train/loss"] > 0 and m["train/examples_per_s"] > 0 for s, m in seen if "train/loss" in m
    )
    assert set(result.heldout) >= {"heldout/recall_at_1", "heldout/acc_level_1", "heldout/acc_all"}
    assert result.level_order == [4, 2]  # 2 steps cover phases 0 and 2 of the 4 equal phases
    meta = json.loads((result.model_dir / "embedder.json").read_text())
    assert meta["settings"]["pooling"] == "ata" and meta["corpus_sha256"] == corpus.sha256
    assert (result.model_dir / "adapter").is_dir()

    reloaded = Embedder.load(result.model_dir, "cpu")
    assert (reloaded.name, reloaded.revision) == ("t/ata", "k1")
    base = Embedder.from_settings(exp.model, "cpu")
    texts = ["A dog runs in the park.", "Two people are talking."]
    a = reloaded.encode(texts, instruction="Retrieve similar text")
    b = base.encode(texts, instruction="Retrieve similar text")
    assert not torch.allclose(a, b), "the adapter changed nothing"
    again = Embedder.load(result.model_dir, "cpu").encode(
        texts, instruction="Retrieve similar text"
    )
    # the model in memory is the model saved: the trial evaluates it without reloading
    assert result.embedder is not None
    in_memory = result.embedder.encode(texts, instruction="Retrieve similar text")
    assert torch.allclose(in_memory, again, atol=1e-5)
    assert torch.allclose(a, again, atol=1e-6)


def test_the_trial_evaluates_the_trained_model_in_memory(
    tiny_corpus_dir, tmp_path, shared_data, monkeypatch
):
    """train_and_evaluate scores the model it just trained as it is in memory (fails before: it
    saved, then loaded it again, model build and all)."""
    from test_eval_run import sts_subset

    from harness.trial import TrialContext, train_and_evaluate

    task = sts_subset(shared_data, tmp_path, "BIOSSES", 10)
    exp = _exp(tiny_corpus_dir, eval={"tasks": [str(task)], "untrained": False})

    def no_reload(*args, **kwargs):
        raise AssertionError("the trained model was loaded again from disk")

    monkeypatch.setattr(Embedder, "load", no_reload)
    ctx = TrialContext("t", "k", tmp_path / "trial", lambda step, metrics: None, say=lambda s: None)
    ctx.workdir.mkdir()
    out = train_and_evaluate(exp, read_corpus(tiny_corpus_dir), ctx)
    assert {"eval/BIOSSES", "eval/avg", "heldout/recall_at_1"} <= set(out.metrics)
    assert (Path(out.artifacts["model"]) / "embedder.json").is_file()  # still saved


def test_held_out_recall_is_defined_by_the_group_not_the_encoding_batch(tiny_corpus_dir):
    """Held-out texts are encoded at their own batch size; recall@1's candidate groups stay the
    training batch size (fails before: one batch size set both)."""
    from harness.heldout import heldout_metrics

    exp = _exp(tiny_corpus_dir)
    frame = read_corpus(tiny_corpus_dir).frame.sort("id").head(16)
    embedder = Embedder.from_settings(exp.model, "cpu")
    small = heldout_metrics(embedder, frame, batch_size=4, group_size=4)
    large = heldout_metrics(embedder, frame, batch_size=16, group_size=4)
    assert large == pytest.approx(small, abs=1e-6)
    one_group = heldout_metrics(embedder, frame, batch_size=16, group_size=16)
    assert one_group["heldout/recall_at_1"] <= small["heldout/recall_at_1"]  # more candidates


def test_grad_cache_gives_the_same_gradients(tiny_corpus_dir):
    corpus = read_corpus(tiny_corpus_dir)
    exp = _exp(tiny_corpus_dir, model={"pooling": "ata"})
    batch = build_schedule(corpus.frame, "all", steps=1, batch_size=4, seed=0).batches[0]
    torch.manual_seed(0)
    emb = Embedder.from_settings(exp.model, "cpu", lora=True)
    for p in emb.trainable_parameters():  # LoRA B starts at zero: make the gradients non-trivial
        torch.nn.init.normal_(p, std=0.02)
    emb.train()

    def grads(chunk):
        emb.zero_grad(set_to_none=True)
        loss = StepRunner(emb, 0.05, chunk)(batch)
        return loss, [p.grad.clone() for p in emb.trainable_parameters()]

    loss_full, g_full = grads(None)
    loss_chunked, g_chunked = grads(3)
    assert abs(loss_full - loss_chunked) < 1e-5
    for a, b in zip(g_full, g_chunked):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_harness_train_cli_logs_an_mlflow_run(tiny_corpus_dir, tmp_path):
    exp = {
        "name": "cli-train",
        "corpus": {"path": str(tiny_corpus_dir)},
        **TINY,
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "log_model": True},
    }
    exp["train"] = {**exp["train"], "steps": 1}
    exp["model"] = {**exp["model"], "pooling": "mean"}
    exp["grid"] = {"strategy": ["curriculum", "level-2"]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "train",
            str(path),
            "--cell",
            "strategy=level-2",
            "--output",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cli-train").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "level-2"
    assert run.data.params["train.strategy"] == "level-2"
    assert {"trial_key", "corpus_sha256", "git_sha"} <= set(run.data.tags)
    assert "train/loss" in run.data.metrics and "heldout/acc_all" in run.data.metrics
    # where the model is, and the model as a registrable MLflow model (tracking.log_model)
    assert run.data.tags["harness.model_uri"] == f"runs:/{run.info.run_id}/model"
    model_id = run.data.tags["harness.mlflow_model"].removeprefix("models:/")
    assert client.get_logged_model(model_id).source_run_id == run.info.run_id
    assert not (tmp_path / "run" / "st_model").exists()  # logged, not left behind
    assert (tmp_path / "run" / "model" / "embedder.json").is_file()


@pytest.mark.faults
def test_bad_experiment_files_fail_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\ncorpus: {path: c}\nmodel: {pooling: max}\ntrain: {stratgy: curriculum}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "harness.cli", "train", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert (
        str(bad) in out.stderr and "model.pooling" in out.stderr and "train.stratgy" in out.stderr
    )
    assert "Traceback" not in out.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ncorpus: {path: c\n")
    out = subprocess.run(
        [sys.executable, "-m", "harness.cli", "check", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "broken YAML at line" in out.stderr


@pytest.mark.parametrize("name", ["smoke", "pooling", "strategy", "main", "retrieval_only"])
def test_shipped_experiment_files_validate(name):
    from harness.experiment_file import apply_cell, grid_cells, load_experiment

    exp = load_experiment(Path(__file__).parents[1] / "experiments" / f"{name}.yaml")
    for cell in grid_cells(exp):
        apply_cell(exp, cell)


@pytest.mark.faults
def test_a_run_that_diverges_on_its_last_step_fails(tiny_corpus_dir, tmp_path, tally):
    """The loss before the last update is finite, the update makes every LoRA weight NaN/inf: the
    trial must fail, not save a model of NaNs and score it (argmax of NaN reads as recall 0.25).
    The overflow is forced (a fake): with lr bounded to at most 1, a real AdamW step on this model
    does not overflow on demand."""
    corpus = read_corpus(tiny_corpus_dir)
    exp = _exp(
        tiny_corpus_dir, model={"pooling": "mean"}, train={"steps": 1, "max_grad_norm": None}
    )

    real_step = torch.optim.AdamW.step

    def exploding_step(self, *a, **kw):  # a real update whose size overflows float32
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.fill_(float("inf"))
        return real_step(self, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(torch.optim.AdamW, "step", exploding_step)
    try:
        with pytest.raises(FloatingPointError, match="diverged by step 1"):
            train_one(exp, corpus, output_dir=tmp_path, progress=False)
    finally:
        mp.undo()
    assert not (tmp_path / "model").exists(), "a diverged model was saved"
    tally(cases=1, faults=1)


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=.inf",
        "train.lr=.nan",
        "train.temperature=-1",
        "train.seed=99999999999",
        "train.steps=1e12",
        "model.lora.alpha=.inf",
    ],
)
@pytest.mark.faults
def test_numbers_that_cannot_train_are_config_errors(tmp_path, override, tally):
    from harness.config import ConfigError
    from harness.experiment_file import load_experiment

    f = tmp_path / "e.yaml"
    f.write_text("name: e\ncorpus: {path: c}\n")
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_experiment(f, [override])
    tally(cases=1)
