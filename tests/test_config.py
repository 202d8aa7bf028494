"""Experiment files: extends, overrides, validation errors that name file and field, grid cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import ConfigError, trial_key, trial_params
from harness.experiment_file import apply_cell, cell_label, grid_cells, load_experiment, parse_cell


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_extends_merges_and_rebases_paths(tmp_path):
    _write(
        tmp_path,
        "base/base.yaml",
        "name: base\ncorpus: {path: ../corpora/c}\ntrain: {lr: 2e-4, steps: 10}\nmodel: {lora: {r: 16}}\n",
    )
    exp_file = _write(
        tmp_path,
        "exp.yaml",
        "extends: base/base.yaml\nname: e\ntrain: {batch_size: 8}\nmodel: {lora: {alpha: 8}}\n",
    )
    exp = load_experiment(exp_file)
    assert exp.name == "e"
    assert (exp.train.lr, exp.train.steps, exp.train.batch_size) == (2e-4, 10, 8)
    assert (exp.model.lora.r, exp.model.lora.alpha) == (16, 8)
    assert exp.resolve_path(exp.corpus.path).resolve() == (tmp_path / "corpora" / "c").resolve()


def test_extends_keeps_environment_and_absolute_paths(tmp_path, monkeypatch):
    """A base in another folder: ``${VAR}/...`` and absolute paths stay as written (a ``${VAR}``
    path was rebased into ``../${VAR}/...``, which pointed nowhere)."""
    data = tmp_path / "data"
    (data / "BIOSSES").mkdir(parents=True)
    monkeypatch.setenv("NM_TEST_DATA", str(data))
    _write(
        tmp_path,
        "base/base.yaml",
        "name: base\ncorpus: {path: '${NM_TEST_DATA}/corpus'}\n"
        f"eval: {{suite: null, tasks: ['${{NM_TEST_DATA}}/BIOSSES', '{data}/BIOSSES', tasks/X]}}\n",
    )
    exp = load_experiment(_write(tmp_path, "sub/exp.yaml", "extends: ../base/base.yaml\nname: e\n"))
    assert exp.eval.tasks[:2] == ["${NM_TEST_DATA}/BIOSSES", f"{data}/BIOSSES"]  # expanded at use
    assert exp.resolve_path(exp.eval.tasks[2]).resolve() == (tmp_path / "base/tasks/X").resolve()
    assert exp.resolve_path(exp.corpus.path).resolve() == (data / "corpus").resolve()


def test_overrides_and_yaml_floats(tmp_path):
    f = _write(tmp_path, "e.yaml", "name: e\ncorpus: {path: c}\n")
    exp = load_experiment(f, ["train.lr=1e-4", "pooling=mean", "grid.seed=[1, 2]"])
    assert exp.train.lr == 1e-4 and exp.model.pooling == "mean"
    assert exp.grid == {"train.seed": [1, 2]}


@pytest.mark.parametrize(
    "text, fragments",
    [
        (
            "name: x\ncorpus: {path: c}\ntrain: {stratgy: curriculum}\n",
            ["train.stratgy", "unknown key"],
        ),
        ("name: x\ncorpus: {path: c}\ntrain: {lr: fast}\n", ["train.lr", "'fast'"]),
        ("name: x\ncorpus: {path: c}\nmodel: {pooling: max}\n", ["model.pooling", "'max'"]),
        ("name: x\ncorpus: {path: c}\ntrain: {strategy: level-5}\n", ["train.strategy"]),
        ("name: x\n", ["corpus", "required"]),
        ("name: x\ncorpus: {path: c}\ngrid: {poolng: [eos]}\n", ["grid", "poolng"]),
        ("name: x\ncorpus: {path: c\n", ["broken YAML at line"]),
        ("- a\n- b\n", ["top level must be a mapping"]),
        ("extends: missing.yaml\nname: x\n", ["missing.yaml", "not found"]),
    ],
)
@pytest.mark.faults
def test_errors_name_the_file_and_the_field(tmp_path, text, fragments):
    f = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_experiment(f)
    msg = str(e.value)
    assert "bad.yaml" in msg or "missing.yaml" in msg
    for fragment in fragments:
        assert fragment in msg


@pytest.mark.faults
def test_extends_cycle_is_an_error(tmp_path):
    _write(tmp_path, "a.yaml", "extends: b.yaml\nname: a\n")
    _write(tmp_path, "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_experiment(tmp_path / "a.yaml")


def test_grid_cells_labels_and_trial_keys(tmp_path):
    f = _write(
        tmp_path,
        "e.yaml",
        "name: e\ncorpus: {path: c}\ngrid: {strategy: [curriculum, reverse], pooling: [ata, mean], seed: [1, 2]}\n",
    )
    exp = load_experiment(f)
    cells = grid_cells(exp)
    assert len(cells) == 8
    assert cell_label(cells[0]) == "curriculum-ata-s1"
    trial = apply_cell(exp, cells[0])
    assert (trial.train.strategy, trial.model.pooling, trial.train.seed) == ("curriculum", "ata", 1)
    keys = {trial_key(apply_cell(exp, c), "sha") for c in cells}
    assert len(keys) == 8, "every cell has its own key"
    assert trial_key(trial, "sha") == trial_key(apply_cell(load_experiment(f), cells[0]), "sha"), (
        "stable"
    )
    assert trial_key(trial, "sha") != trial_key(trial, "other-corpus")
    params = trial_params(trial)
    assert params["train.strategy"] == "curriculum" and params["model.lora.r"] == 16
    assert parse_cell(["strategy=reverse,pooling=mean"], exp) == {
        "train.strategy": "reverse",
        "model.pooling": "mean",
    }
    with pytest.raises(ConfigError, match="not in the grid"):
        parse_cell(["strategy=random"], exp)


def test_backbone_fields_grid_and_paths(tmp_path):
    _write(
        tmp_path,
        "base/base.yaml",
        "name: base\ncorpus: {path: c}\nmodel: "
        "{init_adapter: ../adapters/mntp, attention: bidirectional, template: llm2vec}\n"
        "mntp: {text: [corpus, ../texts], output: ../adapters/mntp}\n",
    )
    exp_file = _write(
        tmp_path,
        "exp.yaml",
        "extends: base/base.yaml\nname: e\ngrid: {model.attention: [causal, bidirectional]}\n",
    )
    exp = load_experiment(exp_file)
    assert (
        exp.model.init_adapter == "adapters/mntp" and exp.mntp.output == "adapters/mntp"
    )  # relative to exp.yaml now
    assert exp.mntp.text == ["corpus", "texts"]
    assert [cell_label(c) for c in grid_cells(exp)] == [
        "attention=causal",
        "attention=bidirectional",
    ]
    hub = load_experiment(
        exp_file, ["model.init_adapter=McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp"]
    )
    assert hub.model.init_adapter == "McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp"
    assert "mntp.steps" not in trial_params(exp), "the MNTP stage is not a trial param"


def test_the_init_adapter_hash_stands_for_the_adapter_in_the_trial_key(tmp_path):
    f = _write(tmp_path, "e.yaml", "name: e\ncorpus: {path: c}\nmodel: {init_adapter: ./a}\n")
    base = load_experiment(f)
    pinned = load_experiment(f, ["model.init_adapter_sha256=" + "1" * 64])
    moved = load_experiment(
        f, ["model.init_adapter=/elsewhere/a", "model.init_adapter_sha256=" + "1" * 64]
    )
    other = load_experiment(f, ["model.init_adapter_sha256=" + "2" * 64])
    assert trial_key(pinned, "s") == trial_key(moved, "s"), "the same adapter in another folder"
    assert len({trial_key(x, "s") for x in (base, pinned, other)}) == 3


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.attention=sideways", "model.attention"),
        ("model.template=plain", "model.template"),
        ("train.batching=per_task", "train.batching"),
        ("mntp.mask_probability=1.5", "mntp"),
    ],
)
def test_bad_backbone_values_name_the_field(tmp_path, override, field):
    f = _write(tmp_path, "e.yaml", "name: e\ncorpus: {path: c}\nmntp: {output: out}\n")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_experiment(f, [override])


def test_a_pinned_hash_is_a_sha256(tmp_path):
    f = _write(tmp_path, "e.yaml", "name: e\ncorpus: {path: c}\n")
    with pytest.raises(ConfigError, match=r"init_adapter_sha256: .*64 lowercase hex"):
        load_experiment(f, ["model.init_adapter_sha256=abc"])


@pytest.mark.faults
@pytest.mark.parametrize("name", ["../../../escaped", "a/b", "..", "tab\there", "back\\slash"])
def test_a_name_that_would_leave_results_is_refused(tmp_path, name, tally):
    f = _write(tmp_path, "e.yaml", "name: ok\ncorpus: {path: c}\n")
    with pytest.raises(ConfigError, match=r"name: .*plain name"):
        load_experiment(f, [f"name={name}"])
    tally(cases=1)


@pytest.mark.faults
@pytest.mark.parametrize(
    "axis", ["name", "corpus.path", "tracking.uri", "resources.gpus_per_trial", "mntp.steps"]
)
def test_axes_that_cannot_vary_per_trial_are_refused(tmp_path, axis, tally):
    f = _write(tmp_path, "e.yaml", f"name: e\ncorpus: {{path: c}}\ngrid: {{{axis}: [a, b]}}\n")
    with pytest.raises(ConfigError, match="cannot vary per trial"):
        load_experiment(f)
    tally(cases=1)


@pytest.mark.faults
@pytest.mark.parametrize("values", ["[1, 1.0]", "[1, true]", "[curriculum, reverse, curriculum]"])
def test_grid_values_that_are_one_value_are_refused(tmp_path, values, tally):
    from harness.experiment_file import validated_cells

    axis = "strategy" if "curriculum" in values else "seed"
    f = _write(tmp_path, "e.yaml", f"name: e\ncorpus: {{path: c}}\ngrid: {{{axis}: {values}}}\n")
    with pytest.raises(ConfigError, match="repeats a value"):
        validated_cells(load_experiment(f))
    tally(cases=1)


def test_path_parts_never_nest_or_climb():
    from harness.config import path_part

    assert path_part("attention=causal-s1") == "attention=causal-s1"
    for hostile in ("../x", "a/b", "..", "/abs", "a\\b"):
        part = path_part(hostile)
        assert (
            "/" not in part
            and "\\" not in part
            and part not in (".", "..")
            and not part.startswith(".")
        )


@pytest.mark.faults
@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("train.gradient_checkpointing=yes", "yes"),
        ("train.steps=0x10", "0x10"),
        ("train.steps=1:30", "1:30"),
        ("train.steps=1_000", "1_000"),
        ("train.steps=16", 16),
        ("train.lr=1e-4", 1e-4),
        ("train.lr=2.0e-4", 2e-4),
        ("train.gradient_checkpointing=true", True),
        ("grid.seed=[1, 2]", [1, 2]),
    ],
)
def test_yaml_1_1_scalars_in_set_stay_text(item, expected, tally):
    from harness.experiment_file import parse_override

    assert parse_override(item)[1] == expected
    tally(cases=1)


def test_a_hex_step_count_is_an_error_not_sixteen(tmp_path):
    f = _write(tmp_path, "e.yaml", "name: e\ncorpus: {path: c}\n")
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_experiment(f, ["train.steps=0x10"])


def test_a_stream_too_large_to_build_is_refused_before_anything_runs(tmp_path):
    f = _write(tmp_path, "e.yaml", "name: e\ncorpus: {path: c}\n")
    with pytest.raises(ConfigError, match="training examples; at most"):
        load_experiment(f, ["train.steps=10000000", "train.batch_size=64"])


def test_cli_errors_keep_brackets_and_name_the_valid_axes(tmp_path):
    """rich markup ate `[eos]` in echoed overrides (printed as `grid.poolng=`)."""
    from typer.testing import CliRunner

    from harness.cli import app

    exp = tmp_path / "x.yaml"
    exp.write_text("name: x\ncorpus: {path: c}\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["check", str(exp), "--set", "grid.poolng=[eos]"])
    assert result.exit_code == 2
    assert "grid.poolng=[eos]" in result.output
    assert "axes: strategy, pooling, seed or any dotted field" in result.output


def test_trial_keys_of_earlier_stores_stay_the_same():
    """Fields added since (train.schedule_rows, train.other_rows_level, model.init_adapter_recipe)
    leave the key at their defaults: this key was computed by the code of commit fc80777, before
    they existed, so a store made then still resumes."""
    from harness.config import trial_key
    from harness.experiment_file import validate

    exp = validate(
        {
            "name": "k",
            "corpus": {"path": "c"},
            "model": {"name": "packaged:all-minilm-l6-v2", "pooling": "ata"},
            "train": {"strategy": "reverse", "steps": 7, "batch_size": 4, "seed": 3},
        }
    )
    assert trial_key(exp, "a" * 64) == "aae294315eea56f3"
    exp.train.schedule_rows = "synthetic"
    assert trial_key(exp, "a" * 64) != "aae294315eea56f3"


def test_the_mntp_settings_fields_are_pinned():
    """An MNTP adapter's recipe hashes its settings as ``mntp.json`` recorded them; a field added
    to MntpSettings makes every existing adapter's recipe unknown and so changes the trial key of
    every trial built on one (it happened: checkpoint settings pasted into both classes). Adding
    a field here needs a key-neutral default in ``harness/init_adapter.mntp_recipe``."""
    from harness.config import MntpSettings

    assert set(MntpSettings.model_fields) == {
        "text", "output", "attention", "steps", "batch_size", "max_length", "mask_probability",
        "mask_token", "lr", "warmup_steps", "weight_decay", "lora", "gradient_checkpointing",
        "eval_blocks", "seed", "log_every", "device",
    }  # fmt: skip
