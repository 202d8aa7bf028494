"""What a command may replace (synth/outputs.py, README "Reliability"): every command that writes a
folder, pointed at a folder of a user's files, at its own input, and at a folder that holds or lies
in its input, with and without ``--force``; the user's files are checked byte for byte, and so is a
folder of them beside the output. Real corpora (SNLI rows), the real packaged MiniLM (teacher,
miner, exported model), the real CLIs.

Fails before: ``harness export --force`` deleted a folder of user files and, with ``--out`` the
model itself, the model; ``synth merge``, ``synth verify`` and ``--undo`` replaced an existing
corpus without ``--force`` (``--undo --out V`` overwrote the verified corpus in place, leaving its
stale ``rejects.parquet``); ``synth mine`` and ``synth generate`` wrote into a user's folder;
``harness decontaminate --force`` deleted a checked copy with a user's file in it; ``synth merge``
of a part reusing another's row ids dropped its distinct rows as "duplicates".
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import snli_frame
from synth_servers import scripted, serve, synth_config_file
from typer.testing import CliRunner

from harness.cli import app as harness_app
from synth.cli import app as synth_app
from synth.corpus import NEG_COLUMNS, read_corpus, write_corpus

pytestmark = pytest.mark.faults
MINILM = "packaged:all-minilm-l6-v2"


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of a user's files (one in a subfolder, one named like a corpus file); its bytes."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n", encoding="utf-8")
    (path / "README.md").write_text("# my project\n", encoding="utf-8")
    (path / "manifest.json").write_text('{"mine": true}\n', encoding="utf-8")
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def refused(result, *words: str) -> None:
    """Exit code 2 and one line (no traceback) holding ``words``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    line = " ".join(result.output.split())
    assert "error:" in line and all(w in line for w in words), result.output


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, shared_data) -> tuple[Path, Path]:
    """Two small SNLI corpora of different rows."""
    root = tmp_path_factory.mktemp("outputs")
    frame = snli_frame(shared_data, 80, seed=5)
    write_corpus(frame.head(40), root / "a", name="a", build={"kind": "test-fixture"})
    write_corpus(frame.tail(40), root / "b", name="b", build={"kind": "test-fixture"})
    return root / "a", root / "b"


def test_merge_replaces_only_its_own_corpus_and_never_a_part(corpora, tmp_path, tally) -> None:
    a, b = map(str, corpora)
    run = lambda *args: CliRunner().invoke(synth_app, ["merge", a, b, *args])
    beside = user_folder(tmp_path / "beside")
    user = tmp_path / "user"
    files = user_folder(user)
    for force in ([], ["--force"]):
        refused(run("--out", str(user), *force), str(user), "synth merge")
        assert snapshot(user) == files
    for target, relation in ((a, "is the input"), (str(Path(a).parent), "holds the input")):
        refused(run("--out", target, "--force"), relation)
    assert read_corpus(a).sha256 and read_corpus(b).sha256  # both parts intact, hash-checked

    out = tmp_path / "merged"
    assert run("--out", str(out)).exit_code == 0
    first = snapshot(out)
    refused(run("--out", str(out), "--weight", "a=0.5"), "--force replaces it")
    assert snapshot(out) == first
    assert run("--out", str(out), "--weight", "a=0.5", "--force").exit_code == 0
    assert len(read_corpus(out)) == 60
    (out / "notes.txt").write_text("mine", encoding="utf-8")  # a user's file inside our corpus
    refused(run("--out", str(out), "--force"), "notes.txt", "did not write")
    assert (out / "notes.txt").read_text() == "mine" and len(read_corpus(out)) == 60
    assert snapshot(tmp_path / "beside") == beside
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    tally(cases=9, faults=9)


def test_verify_and_undo_write_only_their_own_folders(corpora, tmp_path, tally) -> None:
    source = str(corpora[0])
    run = lambda *args: CliRunner().invoke(synth_app, ["verify", *args, "--quiet"])
    beside = user_folder(tmp_path / "beside")
    user = tmp_path / "user"
    files = user_folder(user)
    verified = tmp_path / "verified"
    for args in (
        [source, "--out", str(user)],
        [source, "--out", str(user), "--force"],
        [source, "--out", source, "--force"],
    ):
        refused(run(*args))
    assert snapshot(user) == files
    assert run(source, "--out", str(verified)).exit_code == 0
    made = snapshot(verified)
    refused(run(source, "--out", str(verified)), "--force replaces it")
    assert snapshot(verified) == made

    # --undo: never over the verified corpus (it held the only copy of the rejects), nor a user's
    undo = lambda *args: run(str(verified), "--undo", *args)
    refused(undo("--out", str(verified), "--force"), "is the input")
    refused(undo("--out", str(user), "--force"), str(user))
    assert snapshot(verified) == made and snapshot(user) == files
    restored = tmp_path / "restored"
    assert undo("--out", str(restored)).exit_code == 0
    assert read_corpus(restored).sha256 == read_corpus(source).sha256
    refused(undo("--out", str(restored)), "--force replaces it")
    assert undo("--out", str(restored), "--force").exit_code == 0
    # a verify folder is not an undo's, nor the other way round
    refused(run(source, "--out", str(restored), "--force"), "not a folder synth verify wrote")
    assert snapshot(tmp_path / "beside") == beside
    tally(cases=10, faults=10)


def test_mine_and_generate_never_write_into_a_users_folder(shared_data, tmp_path, tally) -> None:
    user = tmp_path / "user"
    files = user_folder(user)
    snli = tmp_path / "snli"  # a source folder of the user's, with the data in it
    snli.mkdir()
    (snli / "train.jsonl").write_bytes((shared_data / "SNLI-triplets" / "train.jsonl").read_bytes())
    data = snapshot(snli)
    args = ["mine", "--source", str(snli), "--task-kind", "symmetric", "--max-rows", "30", "-q"]
    mine = lambda out, *more: CliRunner().invoke(synth_app, [*args, "--out", str(out), *more])
    refused(mine(user), str(user), "synth mine")
    refused(mine(user, "--force"), str(user), "synth mine")
    refused(mine(snli, "--force"), "is the input")
    assert snapshot(user) == files and snapshot(snli) == data
    mined = tmp_path / "mined"
    assert mine(mined).exit_code == 0
    refused(mine(mined), "--force replaces it")
    assert mine(mined, "--force").exit_code == 0 and len(read_corpus(mined)) > 0

    # generate resumes into its own folder, and into nothing else (a mined corpus included)
    corpus = snapshot(mined)
    with serve(scripted()) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("NM_TEST_KEY", "k")
        config = synth_config_file(tmp_path / "gen", endpoint={"base_url": url})
        for out in (user, mined):
            refused(
                CliRunner().invoke(synth_app, ["generate", str(config), "--out", str(out), "-q"]),
                str(out),
                "synth generate",
            )
        made = tmp_path / "generated"
        for _ in range(2):  # made, then resumed (nothing left to ask)
            again = CliRunner().invoke(synth_app, ["generate", str(config), "--out", str(made)])
            assert again.exit_code == 0, again.output
    assert snapshot(user) == files and snapshot(mined) == corpus
    tally(cases=9, faults=9)


def test_decontaminate_keeps_a_users_file_inside_its_copy(corpora, tmp_path, shared_data, tally):
    corpus = tmp_path / "snli"
    write_corpus(snli_frame(shared_data, 120), corpus, name="snli")
    exp = tmp_path / "decon.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "name": "decon",
                "corpus": {"path": str(corpus)},
                "eval": {"tasks": [str(shared_data / "STSBenchmark")]},
                "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            }
        ),
        encoding="utf-8",
    )
    run = lambda *args: CliRunner().invoke(harness_app, ["decontaminate", str(exp), *args])
    user = tmp_path / "user"
    files = user_folder(user)
    refused(run("--out", str(user), "--force"), str(user))
    refused(run("--out", str(tmp_path), "--force"), "holds the input")
    assert snapshot(user) == files
    assert run().exit_code == 0
    copy = tmp_path / "snli-clean"
    (copy / "notes.txt").write_text("mine", encoding="utf-8")
    refused(run("--force"), "notes.txt")
    assert (copy / "notes.txt").read_text() == "mine"
    (copy / "notes.txt").unlink()
    assert run("--force").exit_code == 0
    tally(cases=5, faults=5)


def test_export_never_deletes_a_users_folder_nor_its_model(tmp_path, tally) -> None:
    from harness.config import ModelSettings
    from harness.embedder import Embedder

    settings = ModelSettings(
        name=MINILM, pooling="mean", attention="native", template="e5", dtype="float32"
    )
    model = Embedder.from_settings(settings, "cpu", lora=True, name="t/minilm").save(
        tmp_path / "runs" / "model", steps=1
    )
    trained = snapshot(model)
    beside = user_folder(tmp_path / "beside")
    user = tmp_path / "user"
    files = user_folder(user)
    run = lambda out, *more: CliRunner().invoke(
        harness_app, ["export", str(model), "--out", str(out), "--device", "cpu", *more]
    )
    refused(run(user), str(user), "harness export")
    refused(run(user, "--force"), str(user), "harness export")
    refused(run(model, "--force"), "is the input")
    refused(run(model.parent, "--force"), "holds the input")
    refused(run(model / "exported", "--force"), "lies inside the input")
    assert snapshot(user) == files and snapshot(model) == trained

    out = tmp_path / "export"
    assert run(out).exit_code == 0
    exported = snapshot(out)
    refused(run(out), "--force replaces it")
    assert run(out, "--force").exit_code == 0
    assert set(snapshot(out)) == set(exported)
    # as readable as any folder made here (mkdtemp's 0700 is not kept)
    assert out.stat().st_mode & 0o777 == (tmp_path / "beside").stat().st_mode & 0o777
    assert snapshot(tmp_path / "beside") == beside and snapshot(model) == trained
    tally(cases=8, faults=8)


def test_mntp_never_trains_into_a_users_folder_nor_its_texts(tmp_path, shared_data, tally):
    texts = tmp_path / "texts"  # mntp.text: a folder of the user's .txt files
    texts.mkdir()
    lines = (shared_data / "STSBenchmark" / "train.tsv").read_text(encoding="utf-8").splitlines()
    (texts / "sts.txt").write_text("\n".join(x.split("\t")[0] for x in lines[1:65]), "utf-8")
    data = snapshot(texts)
    user = tmp_path / "user"
    files = user_folder(user)

    def mntp(output: Path):
        exp = tmp_path / "mntp.yaml"
        mntp = {"text": [str(texts)], "output": str(output), "steps": 1, "batch_size": 2}
        raw = {"name": "mntp", "corpus": {"path": str(tmp_path / "unused")}, "mntp": mntp}
        exp.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return CliRunner().invoke(harness_app, ["mntp", str(exp), "--no-track"])

    refused(mntp(user), str(user), "harness mntp")
    refused(mntp(texts), "is the input")
    refused(mntp(tmp_path), "holds the input")
    assert snapshot(user) == files and snapshot(texts) == data
    tally(cases=3, faults=3)


def test_train_never_writes_into_a_users_folder_nor_its_corpus(tiny_corpus_dir, tmp_path, tally):
    exp = tmp_path / "train.yaml"
    train = {"steps": 1, "batch_size": 4, "heldout_size": 8}
    raw = {"name": "train", "corpus": {"path": str(tiny_corpus_dir)}, "train": train}
    exp.write_text(yaml.safe_dump(raw), encoding="utf-8")
    user = tmp_path / "user"
    files = user_folder(user)
    corpus = snapshot(tiny_corpus_dir)
    run = lambda out: CliRunner().invoke(
        harness_app, ["train", str(exp), "--output", str(out), "--no-track"]
    )
    refused(run(user), str(user), "harness train")
    refused(run(tiny_corpus_dir), "is the input")
    refused(run(tiny_corpus_dir.parent), "holds the input")
    assert snapshot(user) == files and snapshot(tiny_corpus_dir) == corpus
    tally(cases=3, faults=3)


def test_merge_keeps_rows_whose_ids_another_part_reuses(corpora, tmp_path, tally) -> None:
    """B numbers its rows with A's ids (a corpus made elsewhere) and holds 20 of A's rows under
    other ids: its 40 distinct rows are kept (renamed ``b:id``), the 20 copies dropped."""
    a = read_corpus(corpora[0]).frame
    b = read_corpus(corpora[1]).frame.with_columns(pl.Series("id", a["id"]))
    copies = a.head(20).with_columns(pl.format("copy-{}", pl.col("id")).alias("id"))
    write_corpus(pl.concat([b, copies]), tmp_path / "b", name="b")
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        synth_app, ["merge", str(corpora[0]), str(tmp_path / "b"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    merged = read_corpus(out)
    texts = ["instruction", "query", "positive", *NEG_COLUMNS]
    assert len(merged) == 80 == merged.frame.select(texts).n_unique()
    expected = pl.concat([a, b]).select(texts).unique()
    assert merged.frame.select(texts).sort(texts).equals(expected.sort(texts))
    build = merged.manifest["build"]
    assert build["duplicates_dropped"] == 20 and build["ids_renamed"] == 40
    assert merged.frame.filter(pl.col("id").str.starts_with("b:")).height == 40
    assert "20 duplicates of content dropped" in " ".join(result.output.split())
    tally(cases=1, faults=1, rows=100)
