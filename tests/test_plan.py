"""``harness plan`` on a real SQLite MLflow store whose effect and trial times are chosen here, so
the seeds it asks for and the cost it projects are known in advance."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from test_tables import SHA, Store
from typer.testing import CliRunner

from harness.cli import app
from harness.config import trial_key
from harness.experiment_file import apply_cell, load_experiment
from harness.tables.plan import PlanError, make_plan, render

HALF_HOUR_MS = 1_800_000
# ata - mean per seed: mean 2 points, sd 2 points -> d_z = 1 exactly; one comparison (m = 1), so
# a paired t-test at alpha 0.05 with 80 % power needs 10 seeds (G*Power: 10, power 0.80)
ATA_MINUS_MEAN = [0.0, 0.02, 0.04]
YAML = """
name: planned
corpus: {{path: corpora/none}}
train: {{steps: 4}}
grid: {{pooling: [mean, ata], seed: [0, 1, 2]}}
tables: {{baseline: {{pooling: mean}}}}
resources: {{cpus_per_trial: 2}}
tracking: {{uri: "{uri}"}}
"""


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    s = Store(root)
    path = root / "planned.yaml"
    path.write_text(YAML.format(uri=s.uri), encoding="utf-8")
    exp = load_experiment(path)
    exp_id = s.experiment("planned")
    for pooling in ("mean", "ata"):
        for seed, diff in enumerate(ATA_MINUS_MEAN):
            cell = {"model.pooling": pooling, "train.seed": seed}
            score = 0.5 + 0.1 * seed + (diff if pooling == "ata" else 0.0)
            run_id = s.trial(
                exp_id,
                None,
                cell,
                trial_key(apply_cell(exp, cell), SHA),
                "RUNNING",
                {"eval/TaskA": score, "eval/avg": score},
                [1.0],
            )
            start = s.client.get_run(run_id).info.start_time
            s.client.set_terminated(run_id, "FINISHED", end_time=start + HALF_HOUR_MS)
    return path


def test_the_plan_asks_for_the_seeds_a_known_effect_needs(planned: Path) -> None:
    plan = make_plan(load_experiment(planned), concurrent=4)
    (ata,) = plan.comparisons
    assert ata.label == "ata" and ata.seeds == 3
    assert ata.dz == pytest.approx(1.0)
    assert ata.needed == 10 and plan.needed == 10 and plan.more == 7
    assert plan.trial_hours == pytest.approx({"mean": 0.5, "ata": 0.5})
    # 7 more seeds x 2 rows = 14 trials of half an hour, 4 at a time: 4 waves
    assert plan.wall_hours == pytest.approx(2.0)
    text = render(plan)
    assert "| ata | 3 | +2.00 | 2.00 | +2.00 | +1.00 | 10 |" in text
    assert "7 more x 2 rows = 14 trials" in text
    assert "7.0 trial-hours = 14.0 CPU core-hours (2 CPU per trial)" in text
    assert "Wall time at 4 concurrent trials: 2.0 h" in text


def test_a_smaller_effect_and_a_stricter_alpha_need_more_seeds(planned: Path) -> None:
    exp = load_experiment(planned)
    half = make_plan(exp, effect=0.01)  # d_z = 0.5 -> 34 seeds (G*Power)
    assert half.comparisons[0].dz == pytest.approx(0.5) and half.needed == 34
    assert make_plan(exp, alpha=0.01).needed > 10
    assert make_plan(exp, power=0.9).needed > 10
    tiny = make_plan(exp, effect=1e-6)
    assert tiny.needed is None and "Out of reach" in render(tiny)


def test_the_cli_prints_the_plan_and_leaves_the_store_alone(planned: Path) -> None:
    store = planned.parent / "mlflow.db"
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    result = CliRunner().invoke(app, ["plan", str(planned), "--effect", "2", "--concurrent", "2"])
    assert result.exit_code == 0, result.output
    assert "| ata | 3 | +2.00 | 2.00 | +2.00 | +1.00 | 10 |" in result.output
    assert "Wall time at 2 concurrent trials: 3.5 h" in result.output
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before
    bad = CliRunner().invoke(app, ["plan", str(planned), "--power", "1.5"])
    assert bad.exit_code == 2 and "--power and --alpha must lie strictly between 0 and 1" in (
        bad.output
    )


def test_one_seed_is_nothing_to_plan_from(planned: Path) -> None:
    exp = load_experiment(planned, ["grid.seed=[0]"])
    with pytest.raises(PlanError, match="no comparison with the baseline has 2 seeds yet"):
        make_plan(exp)
