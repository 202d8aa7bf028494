"""A cheap held-out metric on corpus rows kept out of training (logged as ``heldout/*``).

- ``heldout/recall_at_1``: for each query, is its positive the most similar among the candidates of
  its batch (all positives and all hard negatives of the batch)?
- ``heldout/acc_level_K``: share of rows where cos(query, positive) > cos(query, neg_K), per level;
  ``heldout/acc_all`` pools the levels. Harder levels should score lower.

``level_audit`` scores a whole corpus the same way (``harness audit``): per level, how close the
negatives sit to the query and the positive as the trained model sees them.
"""

from __future__ import annotations

import time
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F

from harness.embedder import Embedder
from harness.schedules import doc_instruction
from synth.audit import RowEmbeddings, audit_report, sample_rows
from synth.corpus import LEVELS, NEG_COLUMNS, Corpus


@torch.inference_mode()
def embed_rows(
    embedder: Embedder, frame: pl.DataFrame, *, batch_size: int = 32, show_progress: bool = False
) -> RowEmbeddings:
    """Normalized embeddings of every row's query, positive and negatives, formatted as training
    formats them: queries with their instruction, documents plain (symmetric rows: instructed too)."""
    instructions = frame["instruction"].to_list()
    kinds = frame["task_kind"].to_list() if "task_kind" in frame.columns else [None] * frame.height
    doc_instructions = [doc_instruction(ins, kind) for ins, kind in zip(instructions, kinds)]

    def embed(col: str, instruction_of: list[str | None], max_length: int | None) -> torch.Tensor:
        texts = frame[col].to_list()
        out = torch.zeros((frame.height, embedder.dimension))
        # one encode call per instruction (texts in a call share it)
        for instruction in sorted(set(instruction_of), key=lambda x: (x is not None, x or "")):
            idx = [
                i
                for i, ins in enumerate(instruction_of)
                if ins == instruction and texts[i] is not None
            ]
            if idx:
                out[idx] = embedder.encode(
                    [texts[i] for i in idx],
                    instruction=instruction,
                    batch_size=batch_size,
                    max_length=max_length,
                    show_progress=show_progress,
                )
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                "held-out embeddings are not finite: the model is broken (NaN or inf weights or activations)"
            )
        return F.normalize(out, dim=-1)

    doc_length = embedder.settings.max_doc_length
    return RowEmbeddings(
        embed(
            "query", [ins or None for ins in instructions], None
        ),  # the query length when instructed
        embed("positive", doc_instructions, doc_length),
        {col: embed(col, doc_instructions, doc_length) for col in NEG_COLUMNS},
    )


def heldout_metrics(
    embedder: Embedder,
    frame: pl.DataFrame,
    *,
    batch_size: int = 32,
    group_size: int | None = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """The held-out metrics of ``frame``'s rows. ``batch_size`` is how many texts are encoded at
    once (speed only); ``group_size`` (default ``batch_size``) how many rows share their candidates
    for recall@1, the training batch size: it defines the metric."""
    group_size = group_size or batch_size
    if frame.height == 0:
        return {}
    emb = embed_rows(embedder, frame, batch_size=batch_size, show_progress=show_progress)
    q = emb.query
    pos_sim = (q * emb.positive).sum(-1)
    metrics: dict[str, float] = {}
    wins: list[torch.Tensor] = []
    for level, col in zip(LEVELS, NEG_COLUMNS):
        present = frame[col].is_not_null().to_torch()
        if bool(present.any()):
            level_wins = (
                pos_sim[present] > (q[present] * emb.negatives[col][present]).sum(-1)
            ).float()
            metrics[f"heldout/acc_level_{level}"] = float(level_wins.double().mean())
            wins.append(level_wins)
    if wins:
        metrics["heldout/acc_all"] = float(torch.cat(wins).double().mean())

    # recall@1 within groups of the training batch size: positives + hard negatives as candidates
    hits = 0
    for start in range(0, frame.height, group_size):
        end = min(start + group_size, frame.height)
        negatives = [
            emb.negatives[col][start:end][frame[col][start:end].is_not_null().to_torch()]
            for col in NEG_COLUMNS
        ]
        cand = torch.cat([emb.positive[start:end], *negatives])
        scores = q[start:end] @ cand.T
        hits += int((scores.argmax(dim=1) == torch.arange(end - start)).sum())
    metrics["heldout/recall_at_1"] = hits / frame.height
    return metrics


def level_audit(
    embedder: Embedder,
    corpus: Corpus,
    *,
    model: str,
    max_rows: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """``synth audit``'s report with ``embedder`` as the scorer, texts formatted as in training: the
    paper's check that hard negatives sit closer to the query than easy ones, seen by the model the
    harness trained (``harness audit``)."""
    started = time.perf_counter()
    frame = sample_rows(corpus.frame, max_rows, seed)
    emb = embed_rows(embedder, frame, batch_size=batch_size, show_progress=True)
    report = audit_report(
        frame, emb, corpus=corpus, model=model, sampled=frame.height < len(corpus)
    )
    report["pooling"] = embedder.settings.pooling
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report
