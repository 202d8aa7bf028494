"""InfoNCE over in-batch and hard negatives (cosine similarity, temperature)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(
    queries: Tensor, docs: Tensor, temperature: float, exclude: Tensor | None = None
) -> Tensor:
    """Mean InfoNCE loss.

    ``queries`` (B, D); ``docs`` (B + M, D): the B positives first (query i's positive is doc i),
    then the M hard negatives of the whole batch. Every query scores every doc: the other queries'
    positives and all hard negatives are its negatives. ``exclude`` (B, B + M) marks candidates to
    leave out (texts identical to the query's own positive: not negatives at all).
    """
    q = F.normalize(queries.float(), dim=-1)
    d = F.normalize(docs.float(), dim=-1)
    logits = q @ d.T / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude.to(logits.device), float("-inf"))
    target = torch.arange(q.shape[0], device=logits.device)
    return F.cross_entropy(logits, target)


def duplicate_mask(positives: Sequence[str], docs: Sequence[str]) -> Tensor:
    """(B, B + M) True where doc c has the same text as query i's positive but is not doc i."""
    mask = torch.tensor([[doc == pos for doc in docs] for pos in positives], dtype=torch.bool)
    mask[torch.arange(len(positives)), torch.arange(len(positives))] = False
    return mask
