"""A cheap held-out metric on corpus rows kept out of training (logged as ``heldout/*``).

- ``heldout/recall@1``: for each query, is its positive the most similar among the candidates of
  its batch (all positives and all hard negatives of the batch)?
- ``heldout/acc_level_K``: share of rows where cos(query, positive) > cos(query, neg_K), per level;
  ``heldout/acc_all`` pools the levels. Harder levels should score lower.
"""

from __future__ import annotations

import polars as pl
import torch
import torch.nn.functional as F

from harness.embedder import Embedder
from harness.schedules import doc_instruction
from synth.corpus import LEVELS, NEG_COLUMNS


@torch.inference_mode()
def heldout_metrics(embedder: Embedder, frame: pl.DataFrame, *, batch_size: int = 32, show_progress: bool = False) -> dict[str, float]:
    if frame.height == 0:
        return {}
    instructions = frame["instruction"].to_list()
    queries = frame["query"].to_list()
    # group queries by instruction so each encode call shares one instruction
    q_emb = torch.empty((frame.height, embedder.dimension))
    for instruction in sorted(set(instructions)):
        idx = [i for i, ins in enumerate(instructions) if ins == instruction]
        q_emb[idx] = embedder.encode([queries[i] for i in idx], instruction=instruction or None, batch_size=batch_size)
    docs: list[str] = frame["positive"].to_list()
    # symmetric rows embed their documents with the instruction too (as training does)
    kinds = frame["task_kind"].to_list() if "task_kind" in frame.columns else [None] * frame.height
    doc_instructions = [doc_instruction(ins, kind) for ins, kind in zip(instructions, kinds)]
    doc_rows = list(range(frame.height))
    neg_slots: list[tuple[int, int, int]] = []  # (row, level, doc index)
    for level, col in zip(LEVELS, NEG_COLUMNS):
        for row, text in enumerate(frame[col].to_list()):
            if text is not None:
                neg_slots.append((row, level, len(docs)))
                docs.append(text)
                doc_rows.append(row)
    d_emb = torch.empty((len(docs), embedder.dimension))
    for instruction in sorted(set(doc_instructions), key=lambda x: (x is not None, x or "")):
        idx = [i for i, row in enumerate(doc_rows) if doc_instructions[row] == instruction]
        if idx:
            d_emb[idx] = embedder.encode(
                [docs[i] for i in idx],
                instruction=instruction,
                batch_size=batch_size,
                max_length=embedder.settings.max_doc_length,
                show_progress=show_progress,
            )
    if not (torch.isfinite(q_emb).all() and torch.isfinite(d_emb).all()):
        raise FloatingPointError("held-out embeddings are not finite: the model is broken (NaN or inf weights or activations)")
    q = F.normalize(q_emb, dim=-1)
    d = F.normalize(d_emb, dim=-1)
    pos_sim = (q * d[: frame.height]).sum(-1)

    metrics: dict[str, float] = {}
    wins = {lv: [] for lv in LEVELS}
    for row, level, di in neg_slots:
        wins[level].append(float(pos_sim[row] > q[row] @ d[di]))
    for level in LEVELS:
        if wins[level]:
            metrics[f"heldout/acc_level_{level}"] = sum(wins[level]) / len(wins[level])
    all_wins = [w for ws in wins.values() for w in ws]
    if all_wins:
        metrics["heldout/acc_all"] = sum(all_wins) / len(all_wins)

    # recall@1 within batches of the training batch size: positives + hard negatives as candidates
    hits = 0
    rows_of = torch.tensor([r for r, _, _ in neg_slots], dtype=torch.long)
    neg_idx = torch.tensor([di for _, _, di in neg_slots], dtype=torch.long)
    for start in range(0, frame.height, batch_size):
        end = min(start + batch_size, frame.height)
        in_batch = (rows_of >= start) & (rows_of < end)
        cand = torch.cat([d[start:end], d[neg_idx[in_batch]]])
        scores = q[start:end] @ cand.T
        hits += int((scores.argmax(dim=1) == torch.arange(end - start)).sum())
    metrics["heldout/recall@1"] = hits / frame.height
    return metrics
