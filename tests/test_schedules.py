"""Negative schedules: the level sequence of every strategy, determinism, fallbacks; InfoNCE."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from harness.loss import duplicate_mask, info_nce
from harness.schedules import build_schedule, nearest_levels, phase_level, split_heldout
from synth.corpus import RowBuilder


def _frame(n: int = 40, levels: tuple[int, ...] = (1, 2, 3, 4)) -> pl.DataFrame:
    b = RowBuilder()
    for i in range(n):
        b.add(
            source="test",
            task_kind="asymmetric",
            subtask="short-long",
            instruction="find it",
            query=f"q{i}",
            positive=f"p{i}",
            negatives=[f"n{i}-{lv}" if lv in levels else None for lv in (1, 2, 3, 4)],
        )
    return b.frame()


def _levels_per_step(schedule) -> list[set[int]]:
    return [set(levels) for levels in schedule.used_levels()]


def test_curriculum_goes_easy_to_hard_in_equal_phases():
    s = build_schedule(_frame(), "curriculum", steps=8, batch_size=4, seed=0)
    assert _levels_per_step(s) == [{4}, {4}, {3}, {3}, {2}, {2}, {1}, {1}]
    assert s.level_order() == [4, 3, 2, 1]
    assert [(p.start, p.end) for p in s.phases] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_reverse_goes_hard_to_easy():
    s = build_schedule(_frame(), "reverse", steps=8, batch_size=4, seed=0)
    assert _levels_per_step(s) == [{1}, {1}, {2}, {2}, {3}, {3}, {4}, {4}]


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_single_level(level):
    s = build_schedule(_frame(), f"level-{level}", steps=5, batch_size=4, seed=0)
    assert _levels_per_step(s) == [{level}] * 5
    assert all(ex.negatives == (f"{ex.positive.replace('p', 'n')}-{level}",) for b in s for ex in b)


def test_all_uses_four_negatives_per_example():
    s = build_schedule(_frame(), "all", steps=3, batch_size=4, seed=0)
    assert all(ex.levels == (1, 2, 3, 4) for b in s for ex in b)


def test_random_draws_every_level_and_is_seeded():
    s = build_schedule(_frame(), "random", steps=20, batch_size=8, seed=1)
    drawn = [lv for levels in s.used_levels() for lv in levels]
    assert set(drawn) == {1, 2, 3, 4}
    counts = [drawn.count(lv) for lv in (1, 2, 3, 4)]
    assert min(counts) > len(drawn) / 8  # roughly uniform
    again = build_schedule(_frame(), "random", steps=20, batch_size=8, seed=1)
    assert again.batches == s.batches
    other = build_schedule(_frame(), "random", steps=20, batch_size=8, seed=2)
    assert other.batches != s.batches


def test_curriculum_phases_with_uneven_steps():
    steps = 10
    assert [phase_level("curriculum", i, steps) for i in range(steps)] == [
        4,
        4,
        4,
        3,
        3,
        2,
        2,
        2,
        1,
        1,
    ]


def test_same_inputs_same_stream_and_epochs_cover_rows():
    a = build_schedule(_frame(12), "curriculum", steps=6, batch_size=4, seed=3)
    b = build_schedule(_frame(12), "curriculum", steps=6, batch_size=4, seed=3)
    assert a.batches == b.batches
    ids = [ex.row_id for batch in a.batches[:3] for ex in batch]
    assert len(set(ids)) == 12, "one epoch visits every row once"
    for batch in a.batches:
        assert len({ex.row_id for ex in batch}) == len(batch), "no row twice in a batch"


def test_rows_without_the_scheduled_level_keep_their_own_negative():
    retrieval = _frame(8, levels=(1,))  # a retrieval data set with one negative
    s = build_schedule(retrieval, "curriculum", steps=4, batch_size=4, seed=0)
    assert _levels_per_step(s) == [{1}] * 4
    no_negs = _frame(8, levels=())
    s = build_schedule(no_negs, "level-2", steps=2, batch_size=4, seed=0)
    assert all(ex.negatives == () for b in s for ex in b)


def test_extra_negatives_come_from_the_nearest_levels():
    assert nearest_levels(4, [1, 2, 3, 4], 2) == (4, 3)
    assert nearest_levels(2, [1, 2, 3, 4], 3) == (2, 3, 1)
    s = build_schedule(_frame(), "curriculum", steps=4, batch_size=4, seed=0, negatives_per_query=2)
    assert s.used_levels()[0][:2] == (4, 3)
    assert s.used_levels()[-1][:2] == (1, 2)


def test_heldout_is_fixed_and_disjoint():
    f = _frame(30)
    train, held = split_heldout(f, 5)
    assert held.height == 5 and train.height == 25
    assert not set(held["id"]) & set(train["id"])
    assert (
        split_heldout(f.sample(fraction=1.0, shuffle=True, seed=1), 5)[1]["id"].to_list()
        == held["id"].to_list()
    )
    with pytest.raises(ValueError, match="no training rows"):
        split_heldout(f, 30)


def test_too_small_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than batch_size"):
        build_schedule(_frame(3), "curriculum", steps=2, batch_size=4, seed=0)


def test_info_nce_matches_a_hand_computation():
    torch.manual_seed(0)
    q, d = torch.randn(3, 5), torch.randn(6, 5)
    t = 0.05
    loss = info_nce(q, d, t)
    qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(d, dim=-1)
    expected = 0.0
    for i in range(3):
        logits = [float(qn[i] @ dn[j]) / t for j in range(6)]
        expected += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    assert abs(float(loss) - expected / 3) < 1e-4


def test_identical_texts_are_not_negatives():
    mask = duplicate_mask(["a", "b"], ["a", "b", "a", "c"])
    assert mask.tolist() == [[False, False, True, False], [False, False, False, False]]
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    assert info_nce(q, d, 0.1, mask) < info_nce(q, d, 0.1)


def _tasks_frame() -> pl.DataFrame:
    """Three tasks of 10, 7 and 3 rows; one of them symmetric."""
    b = RowBuilder()
    for source, subtask, kind, n in (
        ("syn", "short-long", "asymmetric", 10),
        ("syn", "sts", "symmetric", 7),
        ("nq", "nq", "retrieval", 3),
    ):
        for i in range(n):
            b.add(
                source=source,
                task_kind=kind,
                subtask=subtask,
                instruction=f"do {subtask}",
                query=f"{subtask}-q{i}",
                positive=f"{subtask}-p{i}",
                negatives=[f"{subtask}-n{i}-{lv}" for lv in (1, 2, 3, 4)],
            )
    return b.frame()


@pytest.mark.parametrize("batching", ["mixed", "by_task"])
def test_every_strategy_sees_the_same_rows_in_the_same_order(batching):
    """Only the level differs between strategies with one seed (random used to share one RNG
    between the row shuffle and its level draws, so its rows drifted from the second epoch on)."""
    frame = _tasks_frame()
    rows = {
        strategy: [
            [ex.row_id for ex in batch]
            for batch in build_schedule(
                frame, strategy, steps=12, batch_size=3, seed=5, batching=batching
            )
        ]
        for strategy in ("curriculum", "reverse", "random", "level-2", "all")
    }
    assert all(r == rows["curriculum"] for r in rows.values())


def test_by_task_batches_come_from_one_task_each_and_cover_the_tasks():
    frame = _tasks_frame()
    task_of = dict(zip(frame["id"].to_list(), frame["subtask"].to_list()))
    s = build_schedule(frame, "curriculum", steps=30, batch_size=3, seed=0, batching="by_task")
    tasks = [{task_of[ex.row_id] for ex in batch} for batch in s]
    assert all(len(t) == 1 for t in tasks)
    assert {t.pop() for t in tasks} == {"short-long", "sts", "nq"}
    # an epoch uses every row at most once; a task's remainder waits for the next epoch
    first_epoch = [ex.row_id for batch in s.batches[: 3 + 2 + 1] for ex in batch]
    assert len(set(first_epoch)) == len(first_epoch)
    mixed = build_schedule(frame, "curriculum", steps=30, batch_size=3, seed=0, batching="mixed")
    assert any(len({task_of[ex.row_id] for ex in batch}) > 1 for batch in mixed)


def test_by_task_needs_one_task_with_a_full_batch():
    with pytest.raises(ValueError, match="no task has batch_size=11 rows"):
        build_schedule(
            _tasks_frame(), "curriculum", steps=3, batch_size=11, seed=0, batching="by_task"
        )


def test_symmetric_rows_carry_the_instruction_on_both_sides():
    s = build_schedule(_tasks_frame(), "all", steps=20, batch_size=4, seed=0)
    for ex in (ex for batch in s for ex in batch):
        if ex.query.startswith("sts"):
            assert ex.doc_instruction == ex.instruction == "do sts"
        else:
            assert ex.doc_instruction is None


@pytest.mark.parametrize("strategy", ["curriculum", "reverse", "random", "level-3", "all"])
def test_schedule_rows_synthetic_schedules_only_the_synthetic_rows(strategy):
    """The paper orders the levels of "the synthetic negative samples"; mixed-in retrieval rows
    keep their own (level 1) negative at every step, and the row order is that of "all"."""
    synthetic, retrieval = _frame(20), _frame(20)
    synthetic = synthetic.with_columns(
        pl.lit("synthetic").alias("source"), (pl.col("id") + "s").alias("id")
    )
    frame = pl.concat([synthetic, retrieval.with_columns(pl.lit("msmarco").alias("source"))])
    kinds = dict(zip(frame["id"], frame["source"]))
    only = build_schedule(
        frame, strategy, steps=12, batch_size=8, seed=2, schedule_rows="synthetic"
    )
    every = build_schedule(frame, strategy, steps=12, batch_size=8, seed=2)
    for mine, theirs in zip(only, every):
        assert [e.row_id for e in mine] == [e.row_id for e in theirs]
        for a, b in zip(mine, theirs):
            if kinds[a.row_id] == "synthetic":
                assert a.levels == b.levels  # the strategy's level, as without the option
            else:
                assert a.levels == (1,) and a.negatives == (a.query.replace("q", "n") + "-1",)
    assert only.level_order() == every.level_order()
    easy = build_schedule(
        frame,
        "level-2",
        steps=4,
        batch_size=8,
        seed=2,
        schedule_rows="synthetic",
        other_rows_level=4,
    )
    assert {e.levels for batch in easy for e in batch if kinds[e.row_id] != "synthetic"} == {(4,)}


def test_schedule_rows_synthetic_on_a_corpus_without_synthetic_rows_is_refused(tiny_corpus_dir):
    """The small ablations extend the paper configs (schedule_rows: synthetic) and train on a mined
    corpus: without a word, no row would have followed the strategy and every strategy would have
    trained the same. Refused before anything trains."""
    from harness.config import ConfigError
    from harness.corpora import check_corpus_fits
    from harness.experiment_file import validate
    from synth.corpus import read_corpus

    exp = validate(
        {
            "name": "x",
            "corpus": {"path": str(tiny_corpus_dir)},
            "train": {"schedule_rows": "synthetic", "batch_size": 4, "heldout_size": 8},
        }
    )
    with pytest.raises(
        ConfigError, match=r"has no rows whose source is 'synthetic'.*set train\.schedule_rows: all"
    ):
        check_corpus_fits(exp, read_corpus(tiny_corpus_dir))
    exp.train.schedule_rows = "all"
    check_corpus_fits(exp, read_corpus(tiny_corpus_dir))
