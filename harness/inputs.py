"""A model's inputs: one text becomes token ids and a pool mask, a batch becomes padded tensors.

Self-contained (torch only, nothing of the harness) because two places build inputs and must build
the same ones: :class:`harness.embedder.Embedder` and the sentence-transformers module that
``harness export`` ships in the exported folder (``harness/st_module.py``).

- every decoder input ends with EOS (appended when the tokenizer does not), which ``eos`` pooling
  reads;
- the pool mask leaves out the part of the input format before the text (the instruction and the
  template's opening) when ``skip_instruction`` is on, found through the tokenizer's character
  offsets, so no token-boundary guessing;
- an input over budget loses the end of its text, never the template's closing (LLM2Vec cuts the
  text too);
- positions count real tokens only, so left and right padding give the same vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# (text, instruction) -> the string fed to the model and the character where its pooled span starts
Render = Callable[[str, str | None], tuple[str, int]]


@dataclass
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    pool_mask: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.attention_mask, self.position_ids, self.pool_mask)
            )
        )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


@dataclass
class Encoded:
    """One tokenized text before padding."""

    ids: list[int]
    pooled: list[bool]


def tokenize_one(
    tokenizer: Any,
    render: Render,
    text: str,
    instruction: str | None,
    max_length: int,
    *,
    eos_id: int | None,
    skip_instruction: bool,
) -> Encoded:
    """Token ids of one input (at most ``max_length``, EOS included) and which of them are pooled.

    Args:
        render: the input format (see :data:`Render`).
        eos_id: the id appended to every input (decoders), or None (encoders).
        skip_instruction: leave the part before the text out of the pool.
    """
    budget = max_length - (1 if eos_id is not None else 0)
    full, pool_start = render(text, instruction)
    enc = _encode(tokenizer, full, budget + 1)
    if len(enc["input_ids"]) > budget:
        closing = full[pool_start + len(text) :]
        if closing and text:  # cut the text, keep the template's closing
            full, pool_start, enc = _cut_text(tokenizer, render, text, instruction, budget)
        else:
            enc = _encode(tokenizer, full, budget)
    ids = list(enc["input_ids"])
    skip = skip_instruction and pool_start > 0
    # a token is the text's if it covers any character from the text on ("ĠA" starts on the space before it)
    pooled = [not (skip and end <= pool_start) for _, end in enc["offset_mapping"]]
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids.append(eos_id)
        pooled.append(True)
    if not any(pooled):  # a text truncated inside its instruction: pool what there is
        pooled = [True] * len(ids)
    return Encoded(ids, pooled)


def _encode(tokenizer: Any, full: str, max_length: int) -> Any:
    return tokenizer(
        full,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        add_special_tokens=True,
    )


def _cut_text(
    tokenizer: Any, render: Render, text: str, instruction: str | None, budget: int
) -> tuple[str, int, Any]:
    """The input with the text cut at a token boundary so that the whole fits ``budget`` tokens."""
    overhead = len(_encode(tokenizer, render("", instruction)[0], budget + 1)["input_ids"])
    ends = [
        end
        for _, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
    ]
    keep = min(len(ends), budget - overhead)
    while keep > 0:
        full, pool_start = render(text[: ends[keep - 1]], instruction)
        enc = _encode(tokenizer, full, budget + 1)
        over = len(enc["input_ids"]) - budget
        if over <= 0:
            return full, pool_start, enc
        keep -= over  # tokens merge differently at the cut: try again a little shorter
    full, pool_start = render(text, instruction)  # the instruction alone is over budget
    return full, pool_start, _encode(tokenizer, full, budget)


def collate(items: Sequence[Encoded], *, pad_id: int, left: bool) -> Batch:
    """Pad to the longest item (on the left or the right); positions count real tokens only."""
    length = max(len(it.ids) for it in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    pmask = torch.zeros((len(items), length), dtype=torch.bool)
    for row, it in enumerate(items):
        n = len(it.ids)
        sl = slice(length - n, length) if left else slice(0, n)
        ids[row, sl] = torch.tensor(it.ids)
        mask[row, sl] = 1
        pmask[row, sl] = torch.tensor(it.pooled)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    return Batch(ids, mask, positions, pmask)
