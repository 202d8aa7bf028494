"""MNTP on the real packaged SmolLM2 with local text: masking, the shifted loss, a falling held-out
loss, an adapter that merges into the embedding model, and a sweep that builds it once and ships it."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from sweep_util import runs, write_experiment

from harness.embedder import INIT_ADAPTER_DIR, Embedder
from harness.experiment_file import validate
from harness.mntp import META_FILE, is_done, run_mntp
from harness.mntp_data import MntpError, make_blocks, mask_block, mask_token_id, read_texts
from harness.models import load_backbone
from harness.sweep import run_sweep


def _sts_lines(shared_data, n: int) -> list[str]:
    lines = (
        (shared_data / "STSBenchmark" / "train.tsv")
        .read_text(encoding="utf-8")
        .splitlines()[1 : n + 1]
    )
    return [line.split("\t")[0] for line in lines]


def _exp(tmp_path, text_file, **mntp):
    return validate(
        {
            "name": "mntp-test",
            "corpus": {"path": str(tmp_path / "unused")},
            "model": {"dtype": "float32", "attention": "bidirectional"},
            "mntp": {
                "text": [str(text_file)],
                "output": str(tmp_path / "adapter"),
                "steps": 12,
                "batch_size": 8,
                "max_length": 32,
                "lr": 1e-3,
                "eval_blocks": 16,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                **mntp,
            },
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        }
    )


def test_masking_follows_llm2vec(smollm2_dir):
    backbone = load_backbone(
        validate({"name": "x", "corpus": {"path": "."}}).model, torch.device("cpu")
    )
    tok = backbone.tokenizer
    assert (
        tok.mask_token is None and tok.convert_ids_to_tokens(mask_token_id(tok, None)) == "_"
    )  # LLM2Vec's "blank"
    blocks = make_blocks(["The cat sat on the mat. " * 40] * 4, tok, 64)
    assert blocks.shape[1] == 64 and blocks.shape[0] >= 4
    special = torch.zeros_like(blocks, dtype=torch.bool)
    special[:, 5] = True
    inputs, labels = mask_block(blocks, special, 7, 0.8, torch.Generator().manual_seed(0))
    masked = labels != -100
    assert not masked[:, 0].any(), "nothing predicts the first token"
    assert not masked[:, 5].any(), "special tokens are never masked"
    assert (inputs[masked] == 7).all() and (inputs[~masked] == blocks[~masked]).all()
    assert (labels[masked] == blocks[masked]).all()
    assert 0.7 < masked[:, 1:].float().mean() < 0.9


def test_mntp_lowers_the_held_out_loss_and_its_adapter_merges(smollm2_dir, shared_data, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(_sts_lines(shared_data, 400)), encoding="utf-8")
    exp = _exp(tmp_path, text)
    result = run_mntp(exp, None, track=True, progress=False, say=lambda s: None)
    assert result is not None
    before, after = result.eval_before["mntp/eval_loss"], result.eval_after["mntp/eval_loss"]
    assert after < before - 1.0, (before, after)
    meta = json.loads((tmp_path / "adapter" / META_FILE).read_text())
    assert meta["settings"]["mask_probability"] == 0.8 and meta["base_model"] == exp.model.name
    assert is_done(exp, tmp_path / "adapter")
    assert run_mntp(exp, None, progress=False, say=lambda s: None) is None, (
        "the same settings train again"
    )
    (run,) = runs(tmp_path, "mntp-test", "mntp")
    assert run.info.status == "FINISHED" and float(run.data.params["mntp.mask_probability"]) == 0.8

    # the adapter's weight names are the embedding model's: it merges into AutoModel and changes it
    settings = exp.model.model_copy(
        update={"pooling": "mean", "lora": exp.model.lora.model_copy(update={"enabled": False})}
    )
    base = Embedder.from_settings(settings, "cpu").encode(["A cat sits."])
    merged = Embedder.from_settings(
        settings.model_copy(update={"init_adapter": str(tmp_path / "adapter")}), "cpu"
    ).encode(["A cat sits."])
    assert not torch.allclose(base, merged, atol=1e-3)


def test_mntp_input_errors_are_one_line(tmp_path):
    exp = _exp(tmp_path, tmp_path / "missing.txt")
    with pytest.raises(MntpError, match=r"missing\.txt has no \.txt or \.jsonl"):
        read_texts(exp.mntp.text, exp)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(MntpError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_texts([str(bad)], exp)
    with pytest.raises(MntpError, match="needs the experiment's corpus"):
        read_texts(["corpus"], exp)


@pytest.mark.faults
def test_sweep_over_attention_builds_mntp_once_and_ships_it(
    ray_instance, tiny_corpus_dir, tmp_path
):
    """A real sweep (real training) with grid model.attention [causal, bidirectional]: the driver
    trains the file's MNTP adapter once, pins its hash into every trial, ships its files, and each
    saved model carries a copy."""
    exp = write_experiment(
        tmp_path,
        tiny_corpus_dir,
        "attn",
        model={
            "attention": "bidirectional",
            "template": "llm2vec",
            "init_adapter": str(tmp_path / "mntp"),
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "max_query_length": 24,
            "max_doc_length": 24,
            "dtype": "float32",
        },
        train={
            "steps": 2,
            "batch_size": 4,
            "heldout_size": 8,
            "batching": "by_task",
            "device": "cpu",
            "warmup_steps": 0,
        },
        mntp={
            "text": ["corpus"],
            "output": str(tmp_path / "mntp"),
            "steps": 2,
            "batch_size": 4,
            "max_length": 32,
            "eval_blocks": 4,
        },
        grid={"model.attention": ["causal", "bidirectional"]},
        eval={"enabled": False},
    )
    out = io.StringIO()
    summary = run_sweep(
        exp, [], results_dir=tmp_path / "results", console=Console(file=out, width=200)
    )
    assert summary.exit_code == 0, out.getvalue()[-3000:]
    assert "training the MNTP adapter" in out.getvalue()
    trials = {r.info.run_name: r for r in runs(tmp_path, "attn", "trial")}
    assert set(trials) == {"attention=causal", "attention=bidirectional"}
    assert all(r.info.status == "FINISHED" for r in trials.values())
    shas = {r.data.params["model.init_adapter_sha256"] for r in trials.values()}
    assert len(shas) == 1 and len(shas.pop()) == 64
    assert len({r.data.tags["trial_key"] for r in trials.values()}) == 2
    for run in trials.values():
        model_dir = next(
            (tmp_path / "results" / "models" / "attn").glob(f"{run.info.run_name}-*/model")
        )
        assert (model_dir / INIT_ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert len(runs(tmp_path, "attn", "mntp")) == 1
    out = io.StringIO()
    again = run_sweep(
        exp, [], results_dir=tmp_path / "results", console=Console(file=out, width=200)
    )
    assert again.exit_code == 0 and "nothing to run" in out.getvalue()
    assert len(runs(tmp_path, "attn", "mntp")) == 1, "the adapter was trained again"


def test_a_missing_init_adapter_stops_before_anything_runs(tmp_path):
    from harness.config import ConfigError
    from harness.init_adapter import check_init_adapter, prepare_init_adapter

    exp = _exp(tmp_path, tmp_path / "t.txt")
    exp.model.init_adapter = str(tmp_path / "adapter")  # the file's mntp.output: a sweep builds it
    check_init_adapter(exp)
    exp.model.init_adapter = str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"elsewhere does not exist; make it with `harness mntp"):
        check_init_adapter(exp)
    exp.model.init_adapter = (
        "McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp"  # a Hub id: loaded by the trial
    )
    assert prepare_init_adapter(exp) is None and exp.model.init_adapter_sha256 is None


def test_an_adapter_built_by_the_files_mntp_block_is_keyed_by_its_recipe(tmp_path):
    """A committed store stays valid on a machine that rebuilds the MNTP adapter: the trial key
    follows the recipe (base model, settings, text), not the rebuilt weights' bytes, while the
    weights' hash is still pinned for provenance. A foreign adapter is keyed by its bytes."""
    from safetensors.torch import save_file

    from harness.config import trial_key
    from harness.init_adapter import prepare_init_adapter
    from harness.weights import file_hashes

    def build(weight: float, *, steps: int = 12, folder: str = "adapter"):
        exp = _exp(tmp_path, tmp_path / "t.txt", steps=steps)
        exp.model.init_adapter = str(tmp_path / folder)
        out = tmp_path / folder
        out.mkdir(exist_ok=True)
        (out / "adapter_config.json").write_text("{}", encoding="utf-8")
        save_file({"w": torch.full((2,), weight)}, out / "adapter_model.safetensors")
        meta = {
            "base_model": exp.model.name,
            "settings": exp.mntp.model_dump(mode="json"),
            "text_sha256": "ab" * 32,
            "files": file_hashes(
                out, [out / "adapter_config.json", out / "adapter_model.safetensors"]
            ),
        }
        (out / "mntp.json").write_text(json.dumps(meta), encoding="utf-8")
        prepare_init_adapter(exp)
        return exp

    first, rebuilt = build(1.0), build(2.0)  # the weights of machines A and B
    assert first.model.init_adapter_sha256 != rebuilt.model.init_adapter_sha256
    assert first.model.init_adapter_recipe == rebuilt.model.init_adapter_recipe is not None
    assert trial_key(first, "c" * 64) == trial_key(rebuilt, "c" * 64)
    longer = build(2.0, steps=13)  # another recipe: another key
    assert trial_key(longer, "c" * 64) != trial_key(rebuilt, "c" * 64)
    foreign = build(2.0, folder="elsewhere")  # not the file's mntp.output
    assert foreign.model.init_adapter_recipe is None
    assert trial_key(foreign, "c" * 64) != trial_key(rebuilt, "c" * 64)
