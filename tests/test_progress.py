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
