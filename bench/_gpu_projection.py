"""The GPU-hours of the paper's experiments, projected from ``bench/gpu_check.py``'s measured
training steps and encode rate: one trial, and every trial of the grids of experiment files.
"""

from __future__ import annotations

from typing import Any

from _common import REPO, Report
from _gpu import label

from harness.config import Experiment
from harness.experiment_file import apply_cell, grid_cells, load_experiment

PROJECTED = ("pooling.yaml", "strategy.yaml")  # experiment files whose GPU-hours are projected

# What evaluating mteb-en (MTEB(eng, v1), 56 tasks) encodes: texts and mean tokens per text, by
# task type. [assumed] Approximate, none of it measured here: retrieval from the BEIR paper (Thakur
# et al. 2021, table 1: 33.9M corpus documents of ~70 words on average, FEVER and Climate-FEVER each
# encoding the same 5.4M-document corpus, plus ~50k queries); the other types rounded from their
# test sets' sizes (reranking the least sure); mean tokens guessed from typical text lengths
# (Mistral's tokenizer, ~1.3 tokens a word, plus the instruction). Retrieval is ~87% of the tokens,
# so the estimate stands or falls with it.
MTEB_EN_TEXTS = (
    ("retrieval (15)", 33_950_000, 100),
    ("clustering (11)", 3_100_000, 120),
    ("reranking (4)", 2_500_000, 25),
    ("classification (12)", 520_000, 110),
    ("pair classification (3)", 340_000, 25),
    ("STS (10)", 50_000, 25),
    ("summarization (1)", 3_000, 90),
)


def eval_tokens() -> tuple[int, int]:
    """(texts, tokens) the mteb-en evaluation encodes, from :data:`MTEB_EN_TEXTS`."""
    return (
        sum(n for _, n, _ in MTEB_EN_TEXTS),
        sum(n * tokens for _, n, tokens in MTEB_EN_TEXTS),
    )


def projection(
    measured: dict[tuple[str, str], float],
    *,
    batch: int,
    negatives: int,
    length: int,
    encode_tokens_per_s: float,
    paper: Experiment,
    notes: list[str],
) -> dict[str, Any]:
    """GPU-hours of one trial of ``paper`` and of the grids of :data:`PROJECTED`.

    Args:
        measured: median step seconds by (pooling, attention), at ``batch`` queries with
            ``negatives`` hard negatives each, every text ``length`` tokens.
        encode_tokens_per_s: the inference rate the evaluation is projected with.
        notes: where a substitution (a variant that was not timed) is said.
    """
    texts, tokens = eval_tokens()
    eval_h = tokens / encode_tokens_per_s / 3600

    def trial(exp: Experiment) -> dict[str, Any]:
        attention = "causal" if exp.model.attention == "native" else exp.model.attention
        key = (exp.model.pooling, attention)
        if key not in measured:
            fallback = next(k for k in [("mean", attention), *measured] if k in measured)
            note = f"{label(*key)} not timed: {label(*fallback)}'s step used in the projection"
            if note not in notes:
                notes.append(note)
            key = fallback
        t = exp.train
        docs = (2 + t.negatives_per_query) / (2 + negatives)  # texts per query, vs the timed
        step_s = measured[key] * t.batch_size / batch * docs
        train = t.steps * step_s / 3600
        evaluate = eval_h if exp.eval.enabled and exp.eval.suite == "mteb-en" else 0.0
        return {"steps": t.steps, "batch": t.batch_size, "train_h": train, "eval_h": evaluate}

    files = []
    for name in PROJECTED:
        exp = load_experiment(REPO / "experiments" / name)
        trials = [trial(apply_cell(exp, cell)) for cell in grid_cells(exp)]
        train, evaluate = sum(x["train_h"] for x in trials), sum(x["eval_h"] for x in trials)
        files.append(
            {
                "file": f"experiments/{name}",
                "trials": len(trials),
                "train_h": train,
                "eval_h": evaluate,
                "total_h": train + evaluate,
            }
        )
    one = trial(paper)
    return {
        "trial": {**one, "total_h": one["train_h"] + one["eval_h"]},
        "eval_h": eval_h,
        "eval_upper_bound_h": texts * length / encode_tokens_per_s / 3600,
        "eval_texts": texts,
        "eval_tokens": tokens,
        "files": files,
    }


def render_projection(report: Report, p: dict[str, Any], length: int) -> None:
    t = p["trial"]
    report.para(
        f"Projection, one GPU of this kind. One paper trial (experiments/base.yaml: "
        f"{t['steps']:,} steps at batch {t['batch']}): **{t['train_h']:.1f} GPU-h training + "
        f"{t['eval_h']:.1f} GPU-h mteb-en = {t['total_h']:.1f} GPU-h**."
    )
    report.table(
        ["experiment", "trials", "training (GPU-h)", "mteb-en (GPU-h)", "total (GPU-h)"],
        [
            (
                f["file"],
                f["trials"],
                f"{f['train_h']:.1f}",
                f"{f['eval_h']:.1f}",
                f"{f['total_h']:.1f}",
            )
            for f in p["files"]
        ],
    )
    report.para(
        "Assumptions: training steps scale linearly to the file's batch when a smaller one was "
        "timed (GradCache chunks or more GPUs cost the same GPU-hours, give or take a forward), "
        f"and every training text fills {length} tokens, so training is an upper bound (real "
        "batches pad to their longest text). Evaluation = the tokens mteb-en encodes at the "
        f"measured {length}-token encode rate (shorter texts: less attention, more overhead per "
        f"token): ~{p['eval_texts'] / 1e6:.0f}M texts, ~{p['eval_tokens'] / 1e9:.1f}B tokens "
        f"(table below, approximate); if every text had {length} tokens it would take "
        f"{p['eval_upper_bound_h']:.0f} GPU-h per trial. Not included: MNTP (once per sweep, when "
        "trained offline), held-out scoring, model loading, scoring the embeddings."
    )
    report.table(
        ["mteb-en task type", "texts encoded (approx.)", "mean tokens (assumed)"],
        [(kind, f"{n:,}", tokens) for kind, n, tokens in MTEB_EN_TEXTS],
    )
