"""The sweep driver's progress lines (the Tune callback without Ray: results fed by hand)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from harness.config import TrackingSettings
from harness.driver import TrackingCallback, TrialRecord
from harness.tracking import Tracker
from harness.trial import KIND, STEP, STREAM


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


def _resumed_callback(tmp_path, earlier_losses: dict[int, float] | None):
    """A driver whose trial (key "k") starts a run and then resumes from a step-4 checkpoint an
    earlier sweep left; ``earlier_losses``: that sweep's KILLED run of the trial, if any."""
    from harness.tracking import TRIAL_KEY

    tracker = Tracker(TrackingSettings(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "driver")
    earlier = None
    if earlier_losses is not None:
        old_parent = tracker.start_sweep(params={}, tags={}, config_yaml="")
        earlier = tracker.start_trial(old_parent, name="s0", params={}, tags={TRIAL_KEY: "k"})
        for step, loss in earlier_losses.items():
            tracker.log_metrics(earlier, {"train/loss": loss}, step)
        tracker.client.set_terminated(earlier, "KILLED")
    parent = tracker.start_sweep(params={}, tags={}, config_yaml="")
    fresh = tracker.start_trial(parent, name="s0", params={}, tags={TRIAL_KEY: "k"})
    callback = TrackingCallback(tracker, parent, None, "sha", {}, Console(file=io.StringIO()))  # type: ignore[arg-type]
    callback.records["t1"] = TrialRecord("s0", "k", "RUNNING", fresh)
    callback._specs["t1"] = SimpleNamespace(
        label="s0", exp=SimpleNamespace(train=SimpleNamespace(steps=6))
    )  # type: ignore[assignment]
    callback._fresh.add("t1")
    callback._started["t1"] = 0.0
    trial = SimpleNamespace(trial_id="t1")
    stream = [(step, {"train/loss": 1.0 / step}) for step in range(1, 5)]
    callback.on_trial_result(0, [], trial, {KIND: "resume", STEP: 4, STREAM: stream})
    for step in (5, 6):  # step 5 again (the earlier run has it), then a new one
        callback.on_trial_result(0, [], trial, {KIND: "step", STEP: step, "train/loss": 1.0 / step})
    callback.on_trial_complete(0, [], trial)
    return tracker, parent, earlier, fresh


def _trial_runs(tracker: Tracker) -> list:
    return tracker.client.search_runs([tracker.experiment_id], "tags.`harness.role` = 'trial'")


def _losses(tracker: Tracker, run_id: str) -> list[tuple[int, float]]:
    history = tracker.client.get_metric_history(run_id, "train/loss")
    return sorted((m.step, m.value) for m in history)


def test_a_trial_resumed_from_an_earlier_sweeps_checkpoint_continues_its_run(tmp_path):
    """The killed sweep's run holds steps 1-5, its checkpoint step 4: that run is continued (the
    one just started is dropped) and ends FINISHED with steps 1-6 once each."""
    from harness.tracking import PARENT, RESUMED

    tracker, parent, earlier, fresh = _resumed_callback(
        tmp_path, {step: 1.0 / step for step in range(1, 6)}
    )
    (run,) = _trial_runs(tracker)
    assert run.info.run_id == earlier and run.info.status == "FINISHED"
    assert run.data.tags[RESUMED] == "step 4 after step 5"
    assert run.data.tags[PARENT] == parent  # a child of the sweep that finished it
    assert _losses(tracker, earlier) == [(step, 1.0 / step) for step in range(1, 7)]
    assert tracker.client.get_run(fresh).info.lifecycle_stage == "deleted"


def test_a_run_that_is_not_the_checkpoints_is_not_continued(tmp_path):
    """A KILLED run of the trial whose losses differ from the checkpoint's is another attempt's;
    like a run that is gone, it is left, and the new run gets steps 1-4 from the checkpoint."""
    from harness.tracking import RESUMED

    tracker, _, earlier, fresh = _resumed_callback(tmp_path, {1: 0.9, 2: 0.8})
    statuses = {r.info.run_id: r.info.status for r in _trial_runs(tracker)}
    assert statuses == {earlier: "KILLED", fresh: "FINISHED"}
    assert _losses(tracker, fresh) == [(step, 1.0 / step) for step in range(1, 7)]
    assert tracker.client.get_run(fresh).data.tags[RESUMED] == (
        "step 4 after a run not found (steps 0-4 copied from the checkpoint)"
    )
