"""`harness eval MODEL_OR_RUN`: a saved model folder, or an MLflow run (real SQLite store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import ModelSettings
from harness.evaluation.command import ModelNotFoundError, eval_command


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    from harness.embedder import Embedder

    embedder = Embedder.from_settings(
        ModelSettings(name="packaged:all-minilm-l6-v2", pooling="mean"),
        "cpu",
        name="test/saved-minilm",
    )
    return embedder.save(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def biosses(tmp_path_factory, shared_data: Path) -> str:
    """30 real BIOSSES pairs in a folder named BIOSSES (so mteb's task metadata applies)."""
    folder = tmp_path_factory.mktemp("tasks") / "BIOSSES"
    folder.mkdir()
    lines = (shared_data / "BIOSSES" / "test.tsv").read_text(encoding="utf-8").splitlines()[:31]
    (folder / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder)


def test_saved_model_folder(saved_model: Path, biosses: str, tmp_path: Path, capsys) -> None:
    result = eval_command(
        str(saved_model), None, [biosses], output_dir=str(tmp_path), no_instructions=True
    )
    assert result.result_dir.parts[-4:-2] == (
        "test__saved-minilm",
        "base",
    )  # the saved model's own name
    assert "| BIOSSES | STS | cosine_spearman |" in capsys.readouterr().out


def test_mlflow_run_resolves_to_its_model_and_a_child_run_gets_the_scores(
    saved_model: Path, biosses: str, tmp_path: Path, capsys
) -> None:
    """Re-evaluating a trial logs to a new child run of it (role ``evaluation``): the trial's own
    scores, which the tables read, stay the sweep's (fails before: ``eval/avg`` of BIOSSES alone
    went into the trial run at step 0 beside the sweep's, and the command did not say it logged)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from harness.tracking import EVALUATED_RUN, PARENT, ROLE

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(
        "eval-test", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    run_id = client.create_run(exp_id, tags={ROLE: "trial"}, run_name="mean-s1").info.run_id
    client.log_artifacts(
        run_id, str(saved_model), "model"
    )  # as the sweep driver logs a trial's model
    sweep_scores = {"eval/avg": 0.5, "eval/STS16": 0.5}
    client.log_batch(run_id, [Metric(k, v, 0, 6) for k, v in sweep_scores.items()])
    client.set_terminated(run_id)

    result = eval_command(
        run_id,
        None,
        [biosses],
        output_dir=str(tmp_path / "eval"),
        tracking_uri=uri,
        no_instructions=True,
    )
    assert client.get_run(run_id).data.metrics == sweep_scores  # the trial's, untouched
    (child,) = client.search_runs([exp_id], f"tags.`{EVALUATED_RUN}` = '{run_id}'")
    assert child.data.tags[PARENT] == run_id and child.data.tags[ROLE] == "evaluation"
    assert child.info.status == "FINISHED" and child.info.run_name == "mean-s1 eval BIOSSES"
    logged = child.data.metrics
    assert logged["eval/BIOSSES"] == pytest.approx(result.metrics["eval/BIOSSES"])
    assert {"eval/STS", "eval/avg"} <= logged.keys()
    assert "mteb" in {f.path for f in client.list_artifacts(child.info.run_id)}
    said = " ".join(capsys.readouterr().err.split())
    assert f"logged to MLflow run {child.info.run_id} (an evaluation of trial run {run_id};" in said
    trials = client.search_runs([exp_id], f"tags.`{ROLE}` = 'trial'")
    assert [r.info.run_id for r in trials] == [run_id]  # what the tables read

    with pytest.raises(ModelNotFoundError, match="not found"):
        eval_command("0" * 32, None, [biosses], tracking_uri=uri)


@pytest.mark.parametrize("name", ["missing/path/model", "./missing", "results/models/x/model"])
def test_a_missing_folder_is_named_not_sent_to_the_hub(
    name: str, tmp_path: Path, monkeypatch
) -> None:
    """`harness eval missing/path` answered with the Hub's "Repo id must be ..." error."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ModelNotFoundError, match=r"no such folder \(give a folder saved by `harness train`"
    ):
        eval_command(name, None, ["BIOSSES"])
