"""The sweep driver's progress lines (the Tune callback without Ray: results fed by hand)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from harness.config import TrackingSettings
from harness.driver import TrackingCallback, TrialRecord
from harness.tracking import Tracker
from harness.trial import KIND, STEP


def test_one_progress_line_per_step_and_none_for_the_held_out_score(tmp_path, monkeypatch):
    """The held-out score after training is reported at the last step again: it printed a second
    "step 6/6" line whose s/step counted the held-out scoring (seen in the smoke sweep's console)."""
    monkeypatch.setattr("harness.driver.PROGRESS_EVERY_S", 0.0)
    tracker = Tracker(TrackingSettings(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "driver")
    run_id = tracker.start_trial(None, name="ata", params={}, tags={})
    out = io.StringIO()
    callback = TrackingCallback(tracker, "", None, "sha", {}, Console(file=out, width=200))  # type: ignore[arg-type]
    callback.records["t1"] = TrialRecord("ata", "key", "RUNNING", run_id)
    callback._specs["t1"] = SimpleNamespace(
        label="ata", exp=SimpleNamespace(train=SimpleNamespace(steps=2))
    )  # type: ignore[assignment]
    trial = SimpleNamespace(trial_id="t1")
    for step, metrics in [(0, {"heldout/recall_at_1": 0.1}), (1, {"train/loss": 1.0}),
                          (2, {"train/loss": 0.5}), (2, {"heldout/recall_at_1": 0.4})]:  # fmt: skip
        callback.on_trial_result(0, [], trial, {KIND: "step", STEP: step, **metrics})
    lines = [line.strip() for line in out.getvalue().splitlines()]
    assert [line.split(",")[0] for line in lines] == ["ata: step 1/2", "ata: step 2/2"]
    history = tracker.client.get_metric_history(run_id, "heldout/recall_at_1")
    assert [(m.step, m.value) for m in history] == [(0, 0.1), (2, 0.4)]  # still logged


def test_the_summary_of_the_smoke_grid_fits_80_columns_without_folding():
    """At 80 columns the summary folded every label and key over two lines ("curriculum-e / os")."""
    from harness.driver import SweepSummary, print_summary

    metrics = {"train/loss": 1.8573, "eval/avg": 0.316, "heldout/recall_at_1": 0.5}
    labels = [f"{s}-{p}" for s in ("curriculum", "reverse") for p in ("eos", "mean", "ata")]
    records = [
        TrialRecord(label, "630ba84cd77ff7ea", "FINISHED", "r", 330.0, metrics) for label in labels
    ]
    out = io.StringIO()
    summary = SweepSummary("smoke", "sqlite:///x.db", "p", records, 641.0, 2, "harness tables x")
    print_summary(Console(file=out, width=80), summary)
    lines = out.getvalue().splitlines()
    assert max(map(len, lines[:-1])) <= 80 and "…" not in out.getvalue()
    for label in labels:  # one line per trial: label, short key, status and every metric
        assert any(
            line.split()[:3] == [label, "630ba84c", "FINISHED"] and "0.5000" in line
            for line in lines
        ), out.getvalue()
