"""Per-task scores to category means and the average, as in MTEB and the paper."""

from __future__ import annotations

import pytest

from harness.evaluation import scores
from harness.evaluation.scores import TaskScore


def _row(task: str, category: str, score: float) -> TaskScore:
    return TaskScore(
        task=task, category=category, main_score="m", score=score, split="test", seconds=1.0
    )


def test_category_means_and_average_over_tasks() -> None:
    df = scores.frame(
        [
            _row("STS12", "STS", 0.70),
            _row("SciFact", "Retrieval", 0.60),
            _row("STS13", "STS", 0.80),
            _row("NFCorpus", "Retrieval", 0.30),
            _row("Banking77Classification", "Classification", 0.90),
            _row("Custom", "BitextMining", 0.50),
        ]
    )
    # the paper's category order, then task names; unknown categories last
    assert df["task"].to_list() == [
        "NFCorpus",
        "SciFact",
        "Banking77Classification",
        "STS12",
        "STS13",
        "Custom",
    ]
    means = scores.category_means(df)
    assert means["category"].to_list() == ["Retrieval", "Classification", "STS", "BitextMining"]
    assert means["tasks"].to_list() == [2, 1, 2, 1]
    m = scores.metrics(df)
    assert m["eval/Retrieval"] == pytest.approx(0.45)
    assert m["eval/STS"] == pytest.approx(0.75)
    assert m["eval/avg"] == pytest.approx(
        (0.7 + 0.6 + 0.8 + 0.3 + 0.9 + 0.5) / 6
    )  # over tasks, not categories
    assert m["eval/STS12"] == 0.70
    assert len(m) == 6 + 4 + 1


def test_markdown_prints_scores_x100() -> None:
    text = scores.markdown(scores.frame([_row("STS12", "STS", 0.7237)]))
    assert "| STS12 | STS | m | 72.37 |" in text
    assert "| **avg** (1 tasks) | | mean | 72.37 |" in text


def test_empty_results_give_no_metrics() -> None:
    assert scores.metrics(scores.frame([])) == {}
