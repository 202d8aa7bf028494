"""The progress bar of training and MNTP: its ETA exists when a step takes longer than rich's
default speed window (MNTP on a loaded CPU showed `-:--:--` for a whole run)."""

from __future__ import annotations

from harness.train import progress_bar


def test_the_eta_is_shown_when_steps_are_slower_than_thirty_seconds() -> None:
    """Steps of 40 s: rich's 30 s window holds one update, so it had no speed and no ETA (fails
    before: `ETA -:--:--`); averaged over the run, 97 steps left at 40 s are 1:04:40."""
    from rich.progress import Progress, TimeRemainingColumn

    def eta(bar: Progress) -> str:
        now[0] = 0.0
        task = bar.add_task("MNTP", total=100, loss=1.0, rate=0.2)
        for _ in range(3):
            now[0] += 40.0
            bar.update(task, advance=1, loss=1.0, rate=0.2)
        return str(bar.columns[-1].render(bar.tasks[0]))

    now = [0.0]
    assert eta(progress_bar("blocks", get_time=lambda: now[0])) == "1:04:40"
    # rich's default window, as the bar was built before
    assert eta(Progress(TimeRemainingColumn(), get_time=lambda: now[0])) == "-:--:--"


def test_loading_a_packaged_encoder_leaves_a_quiet_console_quiet() -> None:
    """Mining loads MiniLM with its bars off and then turned them back on, so the sweep's later
    model loads printed transformers' "Loading weights" bar into a quiet console (fails before:
    the bars were on after the load)."""
    from transformers.utils import logging as hf_logging

    from synth.embed import load_encoder

    hf_logging.disable_progress_bar()  # as harness.logs.quiet_logs leaves them
    try:
        load_encoder.cache_clear()
        load_encoder("packaged:all-minilm-l6-v2")
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
