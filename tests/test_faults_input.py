"""Bad input fails fast: before Ray starts or a model loads, with exit code 2 and one message that
names the problem and where (file, field, URI), never a raw traceback. Broken YAML, unknown keys,
wrong types, corpora with missing columns, a truncated parquet, a hash that does not match the
manifest, a corpus too small for the training settings, an unreachable MLflow server, an
unreachable Ray cluster; then hypothesis fuzzes experiment and synthesis files, structured and
byte-mutated, through the loaders and the CLI.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from conftest import repeats
from faults_util import assert_clean_failure
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sweep_util import write_experiment
from typer.testing import CliRunner

from harness.cli import app
from harness.config import ConfigError
from harness.experiment_file import apply_cell, cell_label, grid_cells, load_experiment
from synth.corpus import MANIFEST_FILE, SAMPLES_FILE, sha256_file
from synth.synth_config import SynthConfigError, load_synth_config

pytestmark = pytest.mark.faults
runner = CliRunner()
FAST_S = 20.0  # a bad input is reported within this (imports included), long before any training


def invoke(*args: str) -> tuple[int, str]:
    """``harness ARGS`` in-process; a raw exception (not a clean exit) fails the test."""
    started = time.monotonic()
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert time.monotonic() - started < FAST_S, f"took {time.monotonic() - started:.0f} s: {args}"
    return result.exit_code, result.output


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _corpus_copy(tmp: Path, source: Path, edit: Callable[[Path], None] | None = None) -> Path:
    out = tmp / "corpus"
    shutil.copytree(source, out)
    if edit is not None:
        edit(out)
    return out


def _rehash(corpus: Path) -> None:
    """Make the manifest match whatever samples.parquet now holds (a consistent but bad corpus)."""
    manifest = json.loads((corpus / MANIFEST_FILE).read_text())
    manifest["samples_sha256"] = sha256_file(corpus / SAMPLES_FILE)
    (corpus / MANIFEST_FILE).write_text(json.dumps(manifest))


def _truncate(corpus: Path) -> None:
    data = (corpus / SAMPLES_FILE).read_bytes()
    (corpus / SAMPLES_FILE).write_bytes(data[: len(data) // 2])


def _drop_column(corpus: Path) -> None:
    pl.read_parquet(corpus / SAMPLES_FILE).drop("neg_4", "positive").write_parquet(
        corpus / SAMPLES_FILE
    )


def _int_column(corpus: Path) -> None:
    frame = pl.read_parquet(corpus / SAMPLES_FILE)
    frame.with_columns(pl.int_range(frame.height).alias("neg_2")).write_parquet(
        corpus / SAMPLES_FILE
    )


def _edit_row(corpus: Path) -> None:
    frame = pl.read_parquet(corpus / SAMPLES_FILE)
    frame.with_columns(
        pl.when(pl.int_range(frame.height) == 0)
        .then(pl.lit("edited"))
        .otherwise(pl.col("query"))
        .alias("query")
    ).write_parquet(corpus / SAMPLES_FILE)


CORPUS_CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "missing columns": (
        lambda c: (_drop_column(c), _rehash(c)),
        ["missing column(s) positive, neg_4", SAMPLES_FILE],
    ),
    "wrong column type": (
        lambda c: (_int_column(c), _rehash(c)),
        ["columns must be strings", "neg_2 is Int64"],
    ),
    "truncated parquet": (
        lambda c: (_truncate(c), _rehash(c)),
        ["cannot read parquet", SAMPLES_FILE],
    ),
    "truncated, stale manifest": (_truncate, ["does not match the manifest", SAMPLES_FILE]),
    "edited after writing": (_edit_row, ["does not match the manifest", "rebuild the corpus"]),
    "manifest not JSON": (
        lambda c: (c / MANIFEST_FILE).write_text("{not json"),
        ["not valid JSON", MANIFEST_FILE],
    ),
    "no manifest": (lambda c: (c / MANIFEST_FILE).unlink(), ["no manifest.json", "corpus"]),
}


@pytest.mark.parametrize("case", list(CORPUS_CASES))
def test_a_bad_corpus_fails_the_sweep_before_ray_starts(
    case: str, tmp_path: Path, tiny_corpus_dir: Path, tally: Any
) -> None:
    edit, fragments = CORPUS_CASES[case]
    corpus = _corpus_copy(tmp_path, tiny_corpus_dir, edit)
    code, out = invoke("sweep", str(write_experiment(tmp_path, corpus, "bad-corpus")))
    assert_clean_failure(code, out, *fragments)
    assert not _ray_started() and not (tmp_path / "mlflow.db").exists(), "it got past the corpus"
    tally(cases=1, faults=1)


EXPERIMENT_CASES: dict[str, tuple[str, list[str]]] = {
    "broken YAML": ("name: x\ncorpus: {path: c\n", ["broken YAML at line 3"]),
    "tab-indented YAML": ("name: x\ncorpus:\n\tpath: c\n", ["broken YAML at line 3"]),
    "nested too deeply": (
        "name: x\nextra: " + "[" * 5000 + "]" * 5000 + "\n",
        ["nested too deeply"],
    ),
    "not a mapping": ("- name\n- x\n", ["top level must be a mapping"]),
    "unknown key": (
        "name: x\ncorpus: {path: c}\ntrain: {stratgy: curriculum}\n",
        ["train.stratgy", "unknown key"],
    ),
    "unknown top-level key": (
        "name: x\ncorpus: {path: c}\ntrian: {steps: 3}\n",
        ["trian", "unknown key"],
    ),
    "wrong type": ("name: x\ncorpus: {path: c}\ntrain: {steps: many}\n", ["train.steps", "'many'"]),
    "wrong type in a list": (
        "name: x\ncorpus: {path: c}\neval: {tasks: [1, {a: b}]}\n",
        ["eval.tasks"],
    ),
    "unknown pooling": (
        "name: x\ncorpus: {path: c}\nmodel: {pooling: cls}\n",
        ["model.pooling", "'cls'"],
    ),
    "unknown strategy in the grid": (
        "name: x\ncorpus: {path: c}\ngrid: {strategy: [curriculum, hardest]}\n",
        ["train.strategy", "hardest"],
    ),
    "grid axis that is no field": (
        "name: x\ncorpus: {path: c}\ngrid: {temperature: [0.1]}\n",
        ["grid", "temperature"],
    ),
    "missing corpus": ("name: x\ntrain: {steps: 3}\n", ["corpus", "required field is missing"]),
    "missing base file": ("extends: nowhere.yaml\nname: x\n", ["nowhere.yaml", "not found"]),
}


@pytest.mark.parametrize("case", list(EXPERIMENT_CASES))
def test_a_bad_experiment_file_names_the_file_and_the_field(
    case: str, tmp_path: Path, tally: Any
) -> None:
    text, fragments = EXPERIMENT_CASES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    for command in ("check", "sweep", "train"):
        code, out = invoke(command, str(path))
        assert_clean_failure(
            code, out, "bad.yaml" if "base file" not in case else "nowhere.yaml", *fragments
        )
    assert not _ray_started()
    tally(cases=3, faults=1)


def test_bad_files_overrides_and_corpus_builds_are_named(
    tmp_path: Path, tiny_corpus_dir: Path, tally: Any
) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00x\ncorpus: {path: c}\n")
    good = write_experiment(tmp_path, tiny_corpus_dir, "ok")
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\noutput: o\nendpoint: {modle: m}\n")
    no_key = tmp_path / "no-key.yaml"
    no_key.write_text(
        "name: x\noutput: o\nendpoint: {model: m, base_url: 'http://127.0.0.1:9/v1',"
        " api_key_env: NM_ABSENT_KEY}\n"
    )
    builds = {
        name: write_experiment(
            tmp_path, tmp_path / f"corpus-{name}", f"build-{name}", build_with=config
        )
        for name, config in (("typo", typo), ("no-key", no_key))
    }
    cases = [
        (["check", str(binary)], ["binary.yaml:1: not UTF-8"]),
        (["check", str(good), "--set", "train.lr"], ["expected FIELD=VALUE"]),
        (["check", str(good), "--set", "train.lr=fast"], ["train.lr", "'fast'"]),
        (["check", str(good), "--set", "name.first=x"], ["cannot set 'name.first'"]),
        (["check", str(tmp_path / "absent.yaml")], ["absent.yaml", "not found"]),
        (
            ["sweep", str(good), "--set", "train.batch_size=512"],
            ["train.batch_size=512", "need more rows than corpus", "(120)"],
        ),
        (
            ["sweep", str(builds["typo"])],
            ["build-typo.yaml: corpus.build (generate", "typo.yaml: endpoint.modle"],
        ),
        (
            ["sweep", str(builds["no-key"])],
            ["build-no-key.yaml: corpus.build", "set the environment variable NM_ABSENT_KEY"],
        ),
    ]
    for args, fragments in cases:
        code, out = invoke(*args)
        assert_clean_failure(code, out, *fragments)
    assert not _ray_started()
    tally(cases=len(cases), faults=len(cases))


def test_unreachable_mlflow_and_ray_fail_in_seconds(
    tmp_path: Path, tiny_corpus_dir: Path, tally: Any
) -> None:
    """MLflow's client retries a dead server for minutes: the harness checks first. A Ray address
    nobody listens on is reported before Ray is asked to join it."""
    dead = write_experiment(
        tmp_path, tiny_corpus_dir, "dead-mlflow", tracking={"uri": "http://127.0.0.1:9"}
    )
    for args in (["sweep", str(dead)], ["train", str(dead)], ["tables", str(dead)]):
        code, out = invoke(*args)
        assert_clean_failure(
            code,
            out,
            "dead-mlflow.yaml",
            "tracking.uri http://127.0.0.1:9",
            "no MLflow tracking server",
        )
    code, out = invoke("tables", "--experiment", "x", "--tracking-uri", "http://127.0.0.1:9")
    assert_clean_failure(code, out, "tracking.uri http://127.0.0.1:9")
    good = write_experiment(tmp_path, tiny_corpus_dir, "no-ray")
    code, out = invoke("sweep", str(good), "--address", "127.0.0.1:9")
    assert_clean_failure(code, out, "cannot reach the Ray cluster at 127.0.0.1:9")
    code, out = invoke("sweep", str(good), "--address", "nowhere")
    assert_clean_failure(code, out, "--address 'nowhere': expected HOST:PORT")
    assert not _ray_started()
    tally(cases=7, faults=7)


# ---- fuzzing: never a raw traceback --------------------------------------------------------------

VALID = {
    "name": "fuzz",
    "corpus": {"path": "corpora/c"},
    "model": {"pooling": "ata", "lora": {"r": 8}, "max_query_length": 32},
    "train": {"strategy": "curriculum", "steps": 10, "lr": 1e-4, "batch_size": 8, "seed": 1},
    "grid": {"pooling": ["eos", "mean"], "seed": [1, 2]},
    "eval": {"tasks": ["STS12"], "instructions": {"STS12": "Retrieve similar text."}},
    "resources": {"cpus_per_trial": 1, "custom": {"fake_gpu": 1}},
    "tables": {"rows": ["pooling"], "baseline": {"pooling": "mean"}},
}
KEYS = sorted(
    {k for section in VALID.values() if isinstance(section, dict) for k in section}
    | set(VALID)
    | {
        "extends",
        "search",
        "tracking",
        "uri",
        "params",
        "type",
        "low",
        "high",
        "values",
        "build",
        "kind",
    }
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["eos", "ata", "curriculum", "level-9", "1e-4", "~", "../x", "${HOME}"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=12,
)
documents = st.fixed_dictionaries(
    {},
    optional=dict.fromkeys(
        (
            "name",
            "corpus",
            "model",
            "train",
            "grid",
            "eval",
            "resources",
            "tables",
            "search",
            "extends",
            "tracking",
        ),
        values,
    ),
)


def _mutate(text: str, edits: list[tuple[int, str]]) -> str:
    for pos, piece in edits:
        i = pos % (len(text) + 1)
        text = text[:i] + piece + text[i + len(piece) // 2 :]
    return text


mutations = st.lists(
    st.tuples(
        st.integers(0, 10_000),
        st.sampled_from(
            [
                ":",
                "- ",
                "{",
                "}",
                "[",
                "]",
                "\t",
                "\n",
                "  ",
                "&a",
                "*a",
                "!!binary",
                "!!python/object",
                "'",
                '"',
                "#",
                "%",
                "\x00",
                "\ufffd",
                "---\n",
                "? ",
                # nested aliases: each level repeats the one before (a "billion laughs" chain)
                "\nl0: &l0 [x, x, x, x, x, x, x, x, x, x]\n",
                "\nl1: &l1 [*l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0, *l0]\n",
                "\nl2: &l2 [*l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1]\n",
                "\nl3: &l3 [*l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2]\n",
            ]
        ),
    ),
    min_size=1,
    max_size=6,
)
FUZZ = settings(
    max_examples=repeats(ci=120, full=1500),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _load_or_config_error(path: Path) -> None:
    """Loading gives an experiment whose every cell validates, or a ConfigError naming the file."""
    try:
        exp = load_experiment(path)
        for cell in grid_cells(exp):
            cell_label(cell)
            apply_cell(exp, cell)
    except ConfigError as e:
        assert str(path.name) in str(e) or "extends" in str(e) or "cell" in str(e), str(e)


@FUZZ
@given(doc=documents)
def test_fuzzed_experiment_documents_load_or_fail_with_a_config_error(
    doc: dict[str, Any], tally: Any
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        _load_or_config_error(path)
    tally(cases=1)


@FUZZ
@given(edits=mutations)
def test_mutated_experiment_files_load_or_fail_with_a_config_error(
    edits: list[tuple[int, str]], tally: Any
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(
            _mutate(yaml.safe_dump(VALID), edits), encoding="utf-8", errors="surrogateescape"
        )
        _load_or_config_error(path)
    tally(cases=1)


@settings(FUZZ, max_examples=repeats(ci=40, full=400))
@given(
    depth=st.integers(1, 14), width=st.integers(2, 16), under=st.sampled_from(["", "model", "grid"])
)
def test_alias_chains_load_or_fail_fast_without_eating_memory(
    depth: int, width: int, under: str, tally: Any
) -> None:
    """A chain of anchors, each a list of ``width`` aliases of the one before: width**depth values
    once expanded (up to 16**14). It loads (small) or fails with a ConfigError, in well under a
    second, never building the expansion."""
    chain = "\n".join(
        ["  l0: &l0 [x, y]"]
        + [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth + 1)]
    )
    text = (
        yaml.safe_dump(VALID)
        + (f"{under or 'anchors'}:\n" if under != "grid" else "grid:\n")
        + chain
        + "\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chain.yaml"
        path.write_text(text, encoding="utf-8")
        started = time.monotonic()
        _load_or_config_error(path)
        assert time.monotonic() - started < 5.0
    tally(cases=1)


@settings(FUZZ, max_examples=repeats(ci=30, full=300))
@given(
    doc=documents,
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["{", "\t", ": :", "- ["])), max_size=2
    ),
    overrides=st.lists(st.text(max_size=24), max_size=2),
)
def test_the_cli_never_shows_a_traceback_on_fuzzed_files(
    doc: dict[str, Any], edits: list[tuple[int, str]], overrides: list[str], tally: Any
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(_mutate(yaml.safe_dump(doc), edits), encoding="utf-8")
        args = ["check", str(path)] + [a for o in overrides for a in ("--set", o)]
        result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
    tally(cases=1)


@FUZZ
@given(
    doc=st.fixed_dictionaries(
        {},
        optional=dict.fromkeys(
            (
                "name",
                "output",
                "endpoint",
                "server",
                "concurrency",
                "sampling",
                "budget",
                "tasks",
                "prompts",
                "validation",
            ),
            values,
        ),
    ),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["{", "\t", ": :", "- [", "\x00"])),
        max_size=2,
    ),
)
def test_fuzzed_synthesis_configs_load_or_fail_with_a_synth_config_error(
    doc: dict[str, Any], edits: list[tuple[int, str]], tally: Any
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synth.yaml"
        path.write_text(_mutate(yaml.safe_dump(doc), edits), encoding="utf-8")
        try:
            load_synth_config(path)
        except SynthConfigError as e:
            assert "synth.yaml" in str(e)
    tally(cases=1)


# ---- text inputs: bytes that are not UTF-8, JSON nested past the parser, YAML alias bombs ----------

BAD_BYTES = b"caf\xe9 \xff\xfe"  # Latin-1 and stray bytes: not UTF-8
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)  # 10^9 values once expanded, a few hundred bytes on disk


def _text_input_cases(tmp: Path, shared: Path) -> list[tuple[str, list[str], str]]:
    """(name, command line, expected fragment) for every text input a user hands the two CLIs."""
    from synth_servers import synth_config_file

    cases: list[tuple[str, list[str], str]] = []
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_bytes(
        b'{"query": "q", "positive": "p"}\n{"query": "' + BAD_BYTES + b'", "positive": "p"}\n'
    )
    cases.append(
        (
            "mine --source jsonl, not UTF-8",
            ["synth", "mine", "--source", str(bad_jsonl), "--out", str(tmp / "o1")],
            "bad.jsonl:2: not UTF-8",
        )
    )
    deep = tmp / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    cases.append(
        (
            "mine --source jsonl, nested",
            ["synth", "mine", "--source", str(deep), "--out", str(tmp / "o2")],
            "deep.jsonl:1: JSON nested too deeply",
        )
    )
    beir = tmp / "beir"
    shutil.copytree(shared / "SciFact", beir, ignore=shutil.ignore_patterns("corpus.jsonl"))
    (beir / "corpus.jsonl").write_text(
        '{"_id": "1", "title": "t", "text": "x"}\n', encoding="utf-8"
    )
    for split in ("train", "test"):
        (beir / "qrels" / f"{split}.tsv").write_bytes(
            b"query-id\tcorpus-id\tscore\n1\t" + BAD_BYTES + b"\t1\n"
        )
    cases.append(
        (
            "mine --source BEIR qrels, not UTF-8",
            ["synth", "mine", "--source", str(beir), "--out", str(tmp / "o3")],
            ".tsv:2: not UTF-8",
        )
    )
    for name, content in (("latin1", BAD_BYTES), ("bomb", ALIAS_BOMB.encode())):
        mine_cfg = tmp / f"mine-{name}.yaml"
        mine_cfg.write_bytes(b"sources: [{path: x}]\n" + content if name == "latin1" else content)
        cases.append(
            (
                f"mine config, {name}",
                ["synth", "mine", str(mine_cfg), "--out", str(tmp / "o4")],
                "not UTF-8" if name == "latin1" else "expands to",
            )
        )
        synth_cfg = tmp / f"synth-{name}.yaml"
        synth_cfg.write_bytes(
            synth_config_file(tmp / f"s-{name}").read_bytes() + b"\n# " + content
            if name == "latin1"
            else content
        )
        cases.append(
            (
                f"synth config, {name}",
                ["synth", "generate", str(synth_cfg)],
                "not UTF-8" if name == "latin1" else "expands to",
            )
        )
        exp = tmp / f"exp-{name}.yaml"
        exp.write_bytes(
            b"name: x\ncorpus: {path: c}\n# " + content if name == "latin1" else content
        )
        cases.append(
            (
                f"experiment file, {name}",
                ["harness", "check", str(exp)],
                "not UTF-8" if name == "latin1" else "expands to",
            )
        )
    sts = tmp / "STSX"
    sts.mkdir()
    (sts / "test.tsv").write_bytes(b"sentence1\tsentence2\tscore\nA dog.\t" + BAD_BYTES + b"\t1\n")
    cases.append(
        (
            "eval task tsv, not UTF-8",
            [
                "harness",
                "eval",
                "packaged:all-minilm-l6-v2",
                "--tasks",
                str(sts),
                "--output-dir",
                str(tmp / "ev"),
            ],
            "test.tsv:2: not UTF-8",
        )
    )
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / MANIFEST_FILE).write_bytes(b'{"name": "' + BAD_BYTES + b'"}')
    cases.append(
        (
            "corpus manifest, not UTF-8",
            ["synth", "audit", str(corpus)],
            "manifest.json:1: not UTF-8",
        )
    )
    return cases


@pytest.mark.faults
def test_every_text_input_fails_in_one_line_on_bad_bytes_deep_nesting_and_alias_bombs(
    tmp_path: Path, shared_data: Path, minilm_dir: Path, tally: Any
) -> None:
    from synth.cli import app as synth_app

    cases = _text_input_cases(tmp_path, shared_data)
    for name, (tool, *args), fragment in cases:
        result = runner.invoke(app if tool == "harness" else synth_app, args)
        assert result.exit_code == 2, (name, result.output, repr(result.exception))
        assert fragment in result.output, (name, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3, (
            name,
            result.output,
        )
    tally(cases=len(cases), faults=len(cases))


def test_mntp_text_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    from harness.experiment_file import validate
    from harness.mntp_data import MntpError, read_texts

    bad = tmp_path / "t.txt"
    bad.write_bytes(b"fine line\n" + BAD_BYTES + b"\n")
    exp = validate(
        {"name": "m", "corpus": {"path": "c"}, "mntp": {"output": "o", "text": [str(bad)]}}
    )
    with pytest.raises(MntpError, match=r"t\.txt:2: not UTF-8"):
        read_texts(exp.mntp.text, exp)


@pytest.mark.faults
@pytest.mark.parametrize(
    ("tasks", "fragment"),
    [
        ("[/tmp/no-such-task-folder]", "no-such-task-folder: task folder not found"),
        ("[SciFacts]", "Did you mean: 'SciFact'"),
    ],
)
def test_a_bad_eval_task_is_refused_before_anything_trains(
    tasks: str, fragment: str, tmp_path: Path, tiny_corpus_dir: Path, tally: Any
) -> None:
    """A missing folder or a misspelled task name used to pass `check` and fail the sweep after
    training; now `check`, `sweep` and `train --eval` refuse it first."""
    exp = write_experiment(tmp_path, tiny_corpus_dir, "eval-typo")
    for command in (["check"], ["sweep"], ["train", "--eval"]):
        code, out = invoke(command[0], str(exp), *command[1:], "--set", f"eval.tasks={tasks}")
        assert code == 2 and fragment in " ".join(out.split()), (command, out)
        assert "Traceback" not in out
    assert not _ray_started() and not (tmp_path / "mlflow.db").exists(), "it got past the check"
    tally(cases=3, faults=3)
