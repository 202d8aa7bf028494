"""``harness tables`` on a real SQLite MLflow store laid out as ``harness sweep`` writes it.

The store is built with the MLflow client (no training: the numbers are chosen here), with the
sweep's tags and metric names from ``harness.tracking``, so the expected means, stds and
differences are computed independently below from the same known scores.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import polars as pl
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from scipy import stats as scipy_stats

from harness.config import ConfigError, trial_key
from harness.experiment_file import apply_cell, load_experiment
from harness.tables import TablesError, write_tables
from harness.tables.plots import mean_curve
from harness.tracking import CELL, ERROR, PARENT, ROLE, TRIAL_KEY

SHA = "ab" * 32
TASKS = {"TaskA": "Retrieval", "TaskB": "Retrieval", "TaskC": "STS"}
POOLINGS = ["eos", "mean", "ata"]
SEEDS = [0, 1, 2]
HELDOUT = "heldout/recall_at_1"
# eos differs from mean by +-noise that averages to 0 (no significant difference); ata is better
# than mean by 3 points on every (seed, task) pair (significant).
EOS_OFFSETS = {0: [0.05, -0.05, 0.04], 1: [-0.04, 0.03, -0.03]}
EXPERIMENT_YAML = """
name: abl
description: Pooling of the last hidden states (a test grid)
corpus: {{path: corpora/none}}
train: {{steps: 4}}
grid: {{pooling: [eos, mean, ata], seed: [0, 1, 2]}}
tables: {{baseline: {{pooling: mean}}}}
tracking: {{uri: "{uri}"}}
"""


def task_scores(pooling: str, seed: int) -> dict[str, float]:
    base = {t: 0.40 + 0.1 * i + 0.01 * seed for i, t in enumerate(TASKS)}
    if pooling == "ata":
        return {t: v + 0.03 + 0.001 * (seed + i) for i, (t, v) in enumerate(base.items())}
    if pooling == "eos":
        return {t: v + EOS_OFFSETS[seed][i] for i, (t, v) in enumerate(base.items())}
    return base


def heldout(pooling: str, seed: int) -> float:
    return {"eos": 0.60, "mean": 0.62, "ata": 0.70}[pooling] + 0.02 * seed


def run_metrics(pooling: str, seed: int) -> dict[str, float]:
    """What a trial logs: tasks, category means, the average over tasks, the held-out score."""
    scores = task_scores(pooling, seed)
    out = {f"eval/{t}": v for t, v in scores.items()}
    for cat in sorted(set(TASKS.values())):
        out[f"eval/{cat}"] = statistics.mean(v for t, v in scores.items() if TASKS[t] == cat)
    out["eval/avg"] = statistics.mean(scores.values())
    out[HELDOUT] = heldout(pooling, seed)
    return out


class Store:
    """Writes runs the way ``harness/tracking.py`` lays them out, with explicit start times."""

    def __init__(self, root: Path):
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.root = root
        self.client = MlflowClient(tracking_uri=self.uri)
        self.clock = 1_700_000_000_000

    def tick(self) -> int:
        self.clock += 1000
        return self.clock

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(name, (self.root / "artifacts").as_uri())

    def parent(self, exp_id: str, grid: dict, config_yaml: str | None) -> str:
        run = self.client.create_run(
            exp_id, start_time=self.tick(), run_name="sweep-1", tags={ROLE: "sweep"}
        )
        self.client.log_param(run.info.run_id, "grid", json.dumps(grid))
        if config_yaml is not None:
            self.client.log_text(run.info.run_id, config_yaml, "experiment.yaml")
        self.client.set_terminated(run.info.run_id, "FAILED", end_time=self.tick())
        return run.info.run_id

    def trial(
        self, exp_id: str, parent: str | None, cell: dict, key: str, status: str,
        metrics: dict[str, float], loss: list[float], error: str | None = None,
    ) -> str:  # fmt: skip
        label = (
            "-".join(str(v) for k, v in cell.items() if k != "train.seed")
            + f"-s{cell['train.seed']}"
        )
        tags = {
            ROLE: "trial",
            CELL: json.dumps(cell, sort_keys=True),
            TRIAL_KEY: key,
            "corpus_sha256": SHA,
        }
        if parent:
            tags[PARENT] = parent
        if error:
            tags[ERROR] = error
        run_id = self.client.create_run(
            exp_id, start_time=self.tick(), run_name=label, tags=tags
        ).info.run_id
        history = [Metric("train/loss", v, self.clock, step) for step, v in enumerate(loss)]
        finals = [Metric(k, v, self.clock, len(loss)) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=history + finals, synchronous=True)
        self.client.set_terminated(run_id, status, end_time=self.tick())
        return run_id


def loss_curve(pooling: str, seed: int) -> list[float]:
    return [2.0 - 0.2 * step - 0.05 * POOLINGS.index(pooling) + 0.01 * seed for step in range(5)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tables")
    s = Store(root)
    path = root / "abl.yaml"
    path.write_text(EXPERIMENT_YAML.format(uri=s.uri), encoding="utf-8")
    exp = load_experiment(path)
    exp_id = s.experiment("abl")

    def key(cell: dict) -> str:
        return trial_key(apply_cell(exp, cell), SHA)

    # An earlier sweep: mean-s0 with other numbers (rerun later, the newest must win).
    old_parent = s.parent(exp_id, exp.grid, None)
    cell = {"model.pooling": "mean", "train.seed": 0}
    s.trial(
        exp_id,
        old_parent,
        cell,
        key(cell),
        "FINISHED",
        {**run_metrics("mean", 0), "eval/avg": 0.1},
        [9.0],
    )

    parent = s.parent(
        exp_id, exp.grid, yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False)
    )
    for pooling in POOLINGS:
        for seed in SEEDS:
            cell = {"model.pooling": pooling, "train.seed": seed}
            if (pooling, seed) == ("eos", 2):
                continue  # never ran: the table must say so
            if (pooling, seed) == ("ata", 2):
                s.trial(
                    exp_id,
                    parent,
                    cell,
                    key(cell),
                    "FAILED",
                    {},
                    [2.5],
                    "RuntimeError: CUDA out of memory\ntraceback",
                )
                continue
            s.trial(
                exp_id,
                parent,
                cell,
                key(cell),
                "FINISHED",
                run_metrics(pooling, seed),
                loss_curve(pooling, seed),
            )
    # A newer run of mean-s1 trained with another configuration: the file's configuration wins.
    cell = {"model.pooling": "mean", "train.seed": 1}
    s.trial(
        exp_id,
        parent,
        cell,
        "0ther0config0key",
        "FINISHED",
        {**run_metrics("mean", 1), "eval/avg": 0.9},
        [9.0],
    )

    # A second experiment without any parent run and without eval: rows from the runs' cells,
    # sorted; the held-out score is the main metric.
    bare_id = s.experiment("bare")
    for strategy in ("reverse", "curriculum"):
        for seed in (1, 0):
            cell = {"train.strategy": strategy, "train.seed": seed}
            value = (0.5 if strategy == "curriculum" else 0.4) + 0.01 * seed
            s.trial(
                bare_id,
                None,
                cell,
                f"k-{strategy}-{seed}",
                "FINISHED",
                {HELDOUT: value},
                [1.0, 0.5],
            )
    return {"store": s, "exp": exp, "parent": parent, "root": root}


@pytest.fixture(scope="module")
def written(store: dict):
    out = store["root"] / "out"
    result = write_tables(store["exp"], output_dir=out)
    return result, out


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    return {
        row["pooling"]: row for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
    }


def expected(pooling: str) -> list[dict[str, float]]:
    """The metrics of the runs the table must use: every FINISHED seed of the variant."""
    seeds = {"eos": [0, 1], "mean": [0, 1, 2], "ata": [0, 1]}[pooling]
    return [run_metrics(pooling, s) for s in seeds]


COLUMNS = ["eval/Retrieval", "eval/STS", "eval/avg", HELDOUT]


def test_numbers_match_independent_computation(written) -> None:
    _, out = written
    rows = read_csv(out / "ablation.csv")
    assert list(rows) == POOLINGS  # the grid's declared order
    base = {c: statistics.mean(m[c] for m in expected("mean")) for c in COLUMNS}
    for pooling in POOLINGS:
        runs = expected(pooling)
        row = rows[pooling]
        assert int(row["runs"]) == len(runs)
        for c in COLUMNS:
            values = [m[c] for m in runs]
            assert float(row[f"{c}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
            assert float(row[f"{c}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
            assert float(row[f"{c}_delta"]) == pytest.approx(
                statistics.mean(values) - base[c], abs=1e-12
            )
    assert rows["mean"]["baseline"] == "1" and rows["mean"]["seed_significant"] == ""
    # over seeds: per seed, the mean over the (shared) tasks of ata - mean; seeds 0 and 1 only
    # (ata-s2 FAILED); a paired t-test over those, Holm over the table's 2 comparisons
    per_seed = {
        p: [
            statistics.mean(
                a - m for a, m in zip(task_scores(p, s).values(), task_scores("mean", s).values())
            )
            for s in (0, 1)
        ]
        for p in ("eos", "ata")
    }
    raw = {p: scipy_stats.ttest_1samp(d, 0).pvalue for p, d in per_seed.items()}
    low, high = sorted(raw.values())
    holm = {p: min(1, max(2 * low, high)) if v == high else min(1, 2 * v) for p, v in raw.items()}
    for p, diffs in per_seed.items():
        row = rows[p]
        assert row["seed_n"] == "2"
        assert row["seed_diffs"] == f"0={diffs[0]!r};1={diffs[1]!r}"
        assert float(row["seed_diff"]) == pytest.approx(statistics.mean(diffs), abs=1e-12)
        half = scipy_stats.t.ppf(0.975, 1) * statistics.stdev(diffs) / 2**0.5
        assert float(row["seed_ci_low"]) == pytest.approx(statistics.mean(diffs) - half)
        assert float(row["seed_ci_high"]) == pytest.approx(statistics.mean(diffs) + half)
        assert float(row["seed_dz"]) == pytest.approx(
            statistics.mean(diffs) / statistics.stdev(diffs)
        )
        assert float(row["seed_t_p"]) == pytest.approx(raw[p])
        assert float(row["seed_p_holm"]) == pytest.approx(holm[p])
        assert row["seed_significant"] == str(int(holm[p] < 0.05))
        # the exact sign-flip check over 2 seeds cannot go below p = 0.5
        assert float(row["seed_sign_flip_p"]) == (0.5 if p == "ata" else 1.0)
    # ata's two seeds agree to 0.1 point: the t-test says so (p ~ 0.01, Holm ~ 0.02); eos is noise
    assert rows["ata"]["seed_significant"] == "1" and rows["eos"]["seed_significant"] == "0"
    # over tasks: per task, the seed-averaged difference over the seeds both rows have (0 and 1)
    for p in ("eos", "ata"):
        per_task = [
            statistics.mean(task_scores(p, s)[t] - task_scores("mean", s)[t] for s in (0, 1))
            for t in TASKS
        ]
        row = rows[p]
        assert row["task_n"] == "3" and row["task_seeds"] == "2"
        assert float(row["task_diff"]) == pytest.approx(statistics.mean(per_task), abs=1e-12)
        assert int(row["task_wins"]) == sum(d > 0 for d in per_task)
        assert int(row["task_losses"]) == sum(d < 0 for d in per_task)
        assert float(row["task_wilcoxon_p"]) == pytest.approx(scipy_stats.wilcoxon(per_task).pvalue)
    # three tasks all better: the exact Wilcoxon p is 2/8 at best, and Holm doubles it
    assert float(rows["ata"]["task_wilcoxon_p"]) == pytest.approx(0.25)
    assert rows["ata"]["task_significant"] == "0"


def test_markdown_bold_markers_and_footnotes(written) -> None:
    _, out = written
    md = (out / "ablation.md").read_text(encoding="utf-8")
    main_table = md.split("Comparisons with the baseline")[0]
    lines = {
        line.split(" | ")[0].strip("| "): line
        for line in main_table.splitlines()
        if line.startswith("| ")
    }
    assert (
        lines["pooling"]
        == "| pooling | n | Retrieval | STS | Avg | Held-out R@1 | Δ Avg [95% t-CI] |"
    )
    for c in COLUMNS:  # the best mean of each column, and only it, is bold
        means = {p: statistics.mean(m[c] for m in expected(p)) for p in POOLINGS}
        best = max(means, key=means.__getitem__)
        assert f"**{100 * means[best]:.2f}**" in lines[best]
        for p in POOLINGS:
            if p != best:
                assert f"**{100 * means[p]:.2f}**" not in lines[p]
    std = statistics.stdev(m["eval/STS"] for m in expected("mean"))
    assert f"± {100 * std:.2f}" in lines["mean"]
    delta = statistics.mean(m["eval/avg"] for m in expected("ata")) - statistics.mean(
        m["eval/avg"] for m in expected("mean")
    )
    # the t-interval of the paired test beside the difference, † from the Holm-adjusted p
    rows = read_csv(out / "ablation.csv")
    ci = f"[{100 * float(rows['ata']['seed_ci_low']):+.2f}, {100 * float(rows['ata']['seed_ci_high']):+.2f}]"
    assert lines["ata"].endswith(f"| {100 * delta:+.2f}† {ci} |")
    eos = statistics.mean(m["eval/avg"] for m in expected("eos")) - statistics.mean(
        m["eval/avg"] for m in expected("mean")
    )
    assert f"| {100 * eos:+.2f} [" in lines["eos"] and "†" not in lines["eos"]  # no marker
    assert lines["mean"].endswith("| baseline |")
    assert "Missing: 2 of 9 grid cells have no FINISHED run" in md
    assert "eos-s2 (never run)" in md
    assert "ata-s2 (FAILED: RuntimeError: CUDA out of memory)" in md
    assert "seed in {0, 1, 2}" in md
    assert "†: Holm-adjusted p < 0.05 over the table's 2 comparisons" in md
    assert "Over tasks (is the variant better across tasks?" in md
    # the comparisons: per-seed differences visible, both questions, one line each
    per_seed = [
        statistics.mean(
            a - m for a, m in zip(task_scores("ata", s).values(), task_scores("mean", s).values())
        )
        for s in (0, 1)
    ]
    seeds_line = next(x for x in md.splitlines() if x.startswith("| ata | seeds |"))
    assert f"0: {100 * per_seed[0]:+.2f} 1: {100 * per_seed[1]:+.2f}" in seeds_line
    assert "sign-flip 0.500" in seeds_line
    tasks_line = next(
        x for x in md.splitlines() if x.startswith("| ata | tasks (2 seeds averaged) |")
    )
    assert "3 better, 0 tied, 0 worse" in tasks_line and "Wilcoxon 0.250" in tasks_line
    assert "2 older or superseded runs passed over" in md
    # the experiment file's description is the caption
    assert md.splitlines()[2] == "Pooling of the last hidden states (a test grid)"
    tex = (out / "ablation.tex").read_text(encoding="utf-8")
    assert "\\caption{Pooling of the last hidden states (a test grid) (scores" in tex
    assert "\\toprule" in tex and "\\bottomrule" in tex and "$^\\dagger$" in tex
    assert (
        f"\\textbf{{{100 * max(statistics.mean(m['eval/avg'] for m in expected(p)) for p in POOLINGS):.2f}}}"
        in tex
    )


def test_rerun_is_byte_identical_and_logged_to_the_parent(written, store: dict) -> None:
    result, out = written
    names = sorted(p.name for p in result.files)
    assert names == sorted(
        [
            "ablation.md",
            "ablation.csv",
            "ablation.tex",
            "tasks.md",
            "tasks.csv",
            "tasks.tex",
            "long.parquet",
            "long.csv",
            *(
                f"{plot}.{fmt}"
                for plot in ("loss", "scores", "categories")
                for fmt in ("png", "pdf", "svg")
            ),
        ]
    )
    first = {p.name: p.read_bytes() for p in result.files}
    assert b"Matplotlib" not in first["loss.png"]  # no version text chunk
    again = write_tables(store["exp"], output_dir=out)
    assert {p.name: p.read_bytes() for p in again.files} == first
    logged = store["store"].client.list_artifacts(store["parent"], "tables")
    assert {Path(a.path).name for a in logged} == set(names)
    assert result.parent_run_id == store["parent"]


def test_long_format(written) -> None:
    _, out = written
    df = pl.read_parquet(out / "long.parquet")
    assert df.columns == [
        "experiment",
        "run_id",
        "run_name",
        "trial_key",
        "pooling",
        "seed",
        "metric",
        "kind",
        "name",
        "value",
    ]
    assert df.height == 7 * 7  # 7 FINISHED cells x (3 tasks + 2 categories + avg + held-out)
    assert df.filter(pl.col("kind") == "task").height == 7 * 3
    value = df.filter(
        (pl.col("pooling") == "ata") & (pl.col("seed") == 1) & (pl.col("metric") == "eval/TaskC")
    )
    assert value["value"].to_list() == [pytest.approx(task_scores("ata", 1)["TaskC"])]
    assert pl.read_csv(out / "long.csv").equals(df)


def test_experiment_name_without_file(written, store: dict) -> None:
    _, out = written
    other = store["root"] / "by-name"
    result = write_tables(
        None,
        experiment_name="abl",
        tracking_uri=store["store"].uri,
        output_dir=other,
        log_to_mlflow=False,
    )
    # grid order, baseline and configuration come from the experiment.yaml the sweep logged
    for name in ("ablation.csv", "long.csv", "long.parquet"):
        assert (other / name).read_bytes() == (out / name).read_bytes(), name
    assert "the newest sweep's experiment.yaml" in (other / "ablation.md").read_text(
        encoding="utf-8"
    )
    assert result.parent_run_id is None


def test_runs_without_parent_or_eval(store: dict) -> None:
    out = store["root"] / "bare"
    result = write_tables(
        None, experiment_name="bare", tracking_uri=store["store"].uri, output_dir=out
    )
    rows = list(csv.DictReader(io.StringIO((out / "ablation.csv").read_text(encoding="utf-8"))))
    assert [r["strategy"] for r in rows] == ["curriculum", "reverse"]  # sorted: no declared order
    assert float(rows[1][f"{HELDOUT}_mean"]) == pytest.approx(statistics.mean([0.40, 0.41]))
    assert float(rows[1][f"{HELDOUT}_delta"]) == pytest.approx(-0.1)
    assert rows[1]["test_metric"] == HELDOUT and rows[1]["seed_n"] == "2"
    assert rows[1]["task_n"] == ""  # no tasks: no question over tasks
    md = (out / "ablation.md").read_text(encoding="utf-8")
    assert "| strategy | n | Held-out R@1 | Δ Held-out R@1 [95% t-CI] |" in md
    assert "set tables.baseline to choose" in md and "the runs' cells (sorted)" in md
    assert {p.name for p in result.files} >= {"loss.png", "scores.png"}


@pytest.mark.faults
def test_bad_inputs_name_the_problem(store: dict, tmp_path: Path) -> None:
    uri = store["store"].uri
    with pytest.raises(TablesError, match="no MLflow experiment named 'nope'"):
        write_tables(None, experiment_name="nope", tracking_uri=uri, output_dir=tmp_path)
    with pytest.raises(TablesError, match="no MLflow store"):
        write_tables(
            None,
            experiment_name="abl",
            tracking_uri=f"sqlite:///{tmp_path}/missing.db",
            output_dir=tmp_path,
        )
    exp = store["exp"].model_copy(deep=True)
    exp.tables.baseline = {"pooling": "cls"}
    with pytest.raises(ConfigError, match=r"tables\.baseline .* matches 0 of the rows"):
        write_tables(exp, output_dir=tmp_path)
    exp.tables.baseline, exp.tables.rows = None, ["strategy"]
    with pytest.raises(ConfigError, match=r"tables\.rows: \['strategy'\] are not grid axes"):
        write_tables(exp, output_dir=tmp_path)


def test_mean_curve_over_runs_of_different_length() -> None:
    steps, means, stds = mean_curve([[(0, 2.0), (1, 1.0)], [(0, 4.0)]])
    assert steps == [0, 1] and means == [3.0, 1.0]
    assert stds == [pytest.approx(statistics.stdev([2.0, 4.0])), 0.0]


@pytest.mark.faults
def test_a_run_left_running_by_a_dead_driver_shows_as_killed(tmp_path: Path, tally) -> None:
    """A driver killed with SIGKILL leaves its trial RUNNING in the store until the next sweep;
    the tables must not present it as running."""
    import socket
    import subprocess
    import sys

    from harness.tracking import DRIVER

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    s = Store(tmp_path)
    exp_id = s.experiment("dead")
    for seed, driver in ((0, f"{socket.gethostname()}:{gone.pid}"), (1, "elsewhere:1")):
        cell = {"train.strategy": "curriculum", "train.seed": seed}
        run_id = s.client.create_run(
            exp_id,
            run_name=f"curriculum-s{seed}",
            tags={
                ROLE: "trial",
                CELL: json.dumps(cell, sort_keys=True),
                TRIAL_KEY: f"k{seed}",
                DRIVER: driver,
            },
        ).info.run_id
        s.client.log_metric(run_id, "train/loss", 1.0, step=1)
    fin = {"train.strategy": "reverse", "train.seed": 0}
    s.trial(exp_id, None, fin, "k2", "FINISHED", {HELDOUT: 0.5}, [1.0])
    write_tables(None, experiment_name="dead", tracking_uri=s.uri, output_dir=tmp_path / "out")
    md = (tmp_path / "out" / "ablation.md").read_text(encoding="utf-8")
    assert "curriculum-s0 (KILLED" in md, md
    assert "curriculum-s1 (RUNNING" in md, "another host's driver cannot be judged from here"
    tally(cases=1, faults=1)


def test_the_seed_test_averages_a_seeds_tasks_first() -> None:
    """Three seeds, twenty tasks each: the tasks of a seed move together (one model). Treating the
    60 (seed, task) pairs as independent would call the difference significant; the seeds say it is
    noise (two seeds up, one down)."""
    import numpy as np

    from harness.tables.stats import paired_t_p

    seed_effect = {"s1": 0.05, "s2": 0.04, "s3": -0.03}
    rng = np.random.default_rng(1)
    pairs = {s: [e + rng.normal(0, 0.002) for _ in range(20)] for s, e in seed_effect.items()}
    assert paired_t_p([d for ds in pairs.values() for d in ds]) < 0.001  # the naive reading
    assert paired_t_p([float(np.mean(ds)) for ds in pairs.values()]) > 0.3


def test_a_grown_grid_keeps_every_finished_trial_that_matches_a_cell(tmp_path: Path) -> None:
    """A first sweep without a seed axis (seed 1 from the base settings), then the grid grown to
    seeds [1, 2]: the sweep skips the seed-1 trials by trial key, and the tables must count them
    too (they used to be listed as never run, "outside the grid", leaving n = 1 and no test)."""
    s = Store(tmp_path)
    exp_id = s.experiment("grown")
    for pooling in ("eos", "mean"):
        for seed, cell in (
            (1, {"model.pooling": pooling}),
            (2, {"model.pooling": pooling, "train.seed": 2}),
        ):
            run_id = s.trial(
                exp_id,
                None,
                {**cell, "train.seed": seed},
                f"{pooling}{seed}",
                "FINISHED",
                {HELDOUT: 0.4 + seed / 100},
                [1.0],
            )
            s.client.set_tag(
                run_id, CELL, json.dumps(cell, sort_keys=True)
            )  # as the sweep logged it
            s.client.log_param(run_id, "train.seed", str(seed))
            s.client.log_param(run_id, "model.pooling", pooling)
    path = tmp_path / "grown.yaml"
    path.write_text(
        f"name: grown\ncorpus: {{path: c}}\ngrid: "
        f"{{pooling: [eos, mean], seed: [1, 2]}}\ntracking: {{uri: '{s.uri}'}}\n",
        encoding="utf-8",
    )
    write_tables(load_experiment(path), output_dir=tmp_path / "out", log_to_mlflow=False)
    rows = read_csv(tmp_path / "out" / "ablation.csv")
    assert {p: int(r["runs"]) for p, r in rows.items()} == {"eos": 2, "mean": 2}
    md = (tmp_path / "out" / "ablation.md").read_text(encoding="utf-8")
    assert "never run" not in md and "outside the grid" not in md


def test_the_per_task_table_has_one_column_per_task(written) -> None:
    """Besides the category table, tasks.md/csv/tex: every task's main score, the average, the same
    rows and baseline; LaTeX carries a label to \\ref."""
    _, out = written
    md = (out / "tasks.md").read_text(encoding="utf-8")
    header = next(line for line in md.splitlines() if line.startswith("| pooling"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:2] == ["pooling", "n"] and cells[-2:] == ["Avg", "Δ Avg [95% t-CI]"]
    tasks = cells[2:-2]
    assert (
        tasks == sorted(tasks) and len(tasks) >= 2 and "STS" not in tasks
    )  # tasks, not categories
    assert "each task's mteb main score (eval/<Task>)" in md
    tex = (out / "tasks.tex").read_text(encoding="utf-8")
    assert "\\label{tab:" in tex and "\\label{tab:" in (out / "ablation.tex").read_text(
        encoding="utf-8"
    )


def test_the_statistics_against_known_values() -> None:
    """Each statistic against a value computed another way (a textbook, scipy, a hand count)."""
    from harness.tables import stats

    assert stats.sign_flip_p([0.9, 1.3, 11.8]) == 0.25  # 2 of the 8 sign assignments are as extreme
    assert stats.sign_flip_p([1.0] * 6) == 2 / 64
    assert stats.sign_flip_p([1.0, -1.0]) == 1.0
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1, then made monotone
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5]) == [0.5] and stats.holm([]) == []
    # with 3 seeds the old "95% CI" was the range; the t-interval is wider (t(2) = 4.30)
    low, high = stats.t_interval([0.9, 1.3, 11.8])
    assert low < 0.9 and high > 11.8
    assert stats.paired_t_p([0.9, 1.3, 11.8]) == pytest.approx(
        scipy_stats.ttest_1samp([0.9, 1.3, 11.8], 0).pvalue
    )
    # the seeds one needs: d_z = 0.5 -> 34 and d_z = 1 -> 10 at alpha 0.05, power 0.8 (G*Power)
    assert stats.seeds_needed(0.5) == 34 and stats.seeds_needed(1.0) == 10
    assert stats.seeds_needed(-1.0) == 10  # the sign does not matter to a two-sided test
    assert stats.paired_power(1.0, 10) >= 0.8 > stats.paired_power(1.0, 9)
    assert stats.seeds_needed(0.0) is None and stats.seeds_needed(1e-4) is None
    # an exact sign-flip test needs 6 seeds at 0.05, 8 under Bonferroni over 6 comparisons
    assert stats.sign_flip_min_seeds(0.05) == 6 and stats.sign_flip_min_seeds(0.05 / 6) == 8


def test_the_power_of_the_planned_seeds_is_real() -> None:
    """Simulate: paired differences with d_z = 0.8 at the planned n reject about 80 % of the time
    (the noncentral-t computation is not just self-consistent)."""
    import numpy as np

    from harness.tables import stats

    n = stats.seeds_needed(0.8)
    rng = np.random.default_rng(0)
    draws = rng.normal(0.8, 1.0, size=(4000, n))
    rejected = np.mean([stats.paired_t_p(list(d)) < 0.05 for d in draws])
    assert 0.77 < rejected < 0.86


def test_reading_a_store_never_changes_it(tmp_path: Path) -> None:
    """``harness tables --no-log`` on a store written by an older MLflow (the committed small
    ablations' store): MLflow migrates a store's schema when it opens it, so the tables read a copy
    (fails before: the store's schema and sha256 changed)."""
    import hashlib
    import shutil

    repo = Path(__file__).resolve().parents[1]
    store = tmp_path / "results" / "small" / "mlflow.db"
    store.parent.mkdir(parents=True)
    shutil.copy(repo / "results" / "small" / "mlflow.db", store)
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    result = write_tables(
        None,
        experiment_name="small-pooling",
        tracking_uri=f"sqlite:///{store}",
        output_dir=tmp_path / "out",
        log_to_mlflow=False,
    )
    assert len(result.table.rows) == 3 and (tmp_path / "out" / "ablation.md").is_file()
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before


def test_a_missing_adapter_is_cannot_check_not_an_older_configuration(
    store: dict, tmp_path: Path
) -> None:
    """On a clone without the git-ignored init adapter, the current configuration's trial keys are
    unknown: the footnote says so instead of calling every run "older" (fails before)."""
    text = EXPERIMENT_YAML.format(uri=store["store"].uri).replace(
        "train: {steps: 4}", "train: {steps: 4}\nmodel: {init_adapter: ./adapters/not-here}"
    )
    path = tmp_path / "abl.yaml"
    path.write_text(text, encoding="utf-8")
    write_tables(load_experiment(path), output_dir=tmp_path / "out", log_to_mlflow=False)
    md = (tmp_path / "out" / "ablation.md").read_text(encoding="utf-8")
    assert "older configuration" not in md
    assert "Cannot check whether the runs were trained with the file's current configuration" in md
    assert "model.init_adapter ./adapters/not-here is not on this machine" in md


def test_untrained_rows_one_per_arm_and_a_line_when_training_hurts(tmp_path: Path) -> None:
    """Each pooling has its own untrained model (eval_base/*, heldout_base/*, logged at step 0 by
    every trial of the arm); a strategy axis shares one. A trained row below its own untrained
    model is named in the notes (fails before: no untrained row, nothing said)."""
    s = Store(tmp_path)
    exp_id = s.experiment("arms")
    untrained = {"eos": 0.30, "mean": 0.70}  # mean's training hurts: trained 0.60 + seed
    for pooling in ("eos", "mean"):
        for strategy in ("curriculum", "reverse"):
            for seed in (0, 1):
                cell = {"model.pooling": pooling, "train.strategy": strategy, "train.seed": seed}
                trained = {"eos": 0.50, "mean": 0.60}[pooling] + 0.01 * seed
                s.trial(
                    exp_id,
                    None,
                    cell,
                    f"k-{pooling}-{strategy}-{seed}",
                    "FINISHED",
                    {
                        "eval/TaskC": trained,
                        "eval/avg": trained,
                        "eval_base/TaskC": untrained[pooling],
                        "eval_base/avg": untrained[pooling],
                    },
                    [1.0],
                )
    result = write_tables(
        None,
        experiment_name="arms",
        tracking_uri=s.uri,
        output_dir=tmp_path / "out",
        log_to_mlflow=False,
    )
    table = result.table
    assert [(u.label, u.rows, u.runs) for u in table.untrained] == [
        ("untrained (eos)", (0, 1), 4),
        ("untrained (mean)", (2, 3), 4),
    ]
    assert table.untrained[1].mean["eval/avg"] == pytest.approx(0.70)
    md = (tmp_path / "out" / "ablation.md").read_text(encoding="utf-8")
    assert "| *untrained (mean)* |  | – | 70.00 | – |" in md
    assert (
        "Trained rows below their untrained model: mean / curriculum on Avg (60.50 < 70.00); "
        "mean / reverse on Avg (60.50 < 70.00)." in md
    )
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "ablation.csv").read_text())))
    assert [(r["pooling"], r["strategy"], r["untrained"]) for r in rows[-2:]] == [
        ("eos", "", "1"),
        ("mean", "", "1"),
    ]
    assert float(rows[-1]["eval/avg_mean"]) == pytest.approx(0.70)


def test_the_small_report_uses_the_tables_runs_in_grid_order(tmp_path: Path) -> None:
    """experiments/small/report.py takes, like the tables, the newest FINISHED run of each cell,
    rows in the file's grid order (fails before: every FINISHED run, rerun or not, in search
    order)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "small_report", Path(__file__).resolve().parents[1] / "experiments/small/report.py"
    )
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    s = Store(tmp_path)
    exp_id = s.experiment("rep")
    path = tmp_path / "rep.yaml"
    path.write_text(
        f"name: rep\ncorpus: {{path: c}}\ngrid: {{pooling: [mean, eos], seed: [1, 2]}}\n"
        f"tables: {{baseline: {{pooling: mean}}}}\ntracking: {{uri: '{s.uri}'}}\n",
        encoding="utf-8",
    )
    exp = load_experiment(path)
    scores = [
        ("eos", 1, 0.10),
        ("eos", 1, 0.30),
        ("eos", 2, 0.32),
        ("mean", 1, 0.2),
        ("mean", 2, 0.2),
    ]
    for pooling, seed, value in scores:  # eos seed 1 twice: the newer (0.30) counts
        cell = {"model.pooling": pooling, "train.seed": seed}
        metrics = {"eval/TaskA": value, "eval/avg": value}
        s.trial(
            exp_id, None, cell, trial_key(apply_cell(exp, cell), SHA), "FINISHED", metrics, [1.0]
        )
    lines = report.report(path)
    table = [line for line in lines if line.startswith("| ") and "|---" not in line]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| mean", "| eos"]  # grid order
    assert table[2].startswith("| eos | 2 | 31.00 ± 1.41 |")  # 0.30 and 0.32, not 0.10


def test_the_small_report_tests_the_interaction_seed_by_seed(tmp_path: Path) -> None:
    """Round 2's claim 2: D_s = (ATA - mean) with the LLM2Vec conversion minus (ATA - mean)
    without it, per seed, and a paired t-test over the seeds both files have (the numbers below
    are worked out by hand: D = 0.10, 0.11, 0.15)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "small_report", Path(__file__).resolve().parents[1] / "experiments/small/report.py"
    )
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    s = Store(tmp_path)
    scores = {
        "bidirectional": {"ata": (0.60, 0.62, 0.64), "mean": (0.50, 0.50, 0.50)},
        "causal": {"ata": (0.50, 0.50, 0.50), "mean": (0.50, 0.49, 0.51)},
    }
    paths = []
    for name, rows in scores.items():
        exp_id = s.experiment(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"name: {name}\ncorpus: {{path: c}}\ngrid: {{seed: [1, 2, 3], pooling: [ata, mean]}}\n"
            f"tables: {{baseline: {{pooling: ata}}}}\ntracking: {{uri: '{s.uri}'}}\n",
            encoding="utf-8",
        )
        exp = load_experiment(path)
        for pooling, values in rows.items():
            for seed, value in enumerate(values, 1):
                cell = {"train.seed": seed, "model.pooling": pooling}
                metrics = {"eval/TaskA": value, "eval/avg": value}
                key = trial_key(apply_cell(exp, cell), SHA)
                s.trial(exp_id, None, cell, key, "FINISHED", metrics, [1.0])
        paths.append(path)
    lines = report.interaction(*paths)
    (line,) = [x for x in lines if x.startswith("- X = mean")]
    d = [0.10, 0.11, 0.15]
    t = statistics.mean(d) / (statistics.stdev(d) / 3**0.5)
    p = 2 * scipy_stats.t.sf(t, 2)
    assert "3 seeds: D +12.00" in line and "(1: +10.00, 2: +11.00, 3: +15.00)" in line
    assert f"t-test p = {p:.3g}, Holm p = {p:.3g}" in line  # one comparison: Holm is p itself
