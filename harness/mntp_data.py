"""MNTP's data: the texts of ``mntp.text``, cut into blocks of tokens, and LLM2Vec's masking of
them (see :mod:`harness.mntp` for the recipe)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.config import Experiment
from synth import textfiles

BLANK_MASK = "_"  # LLM2Vec's mask_token_type "blank"


class MntpError(ValueError):
    """MNTP cannot run on this input; the message says what and where."""


# ---------------------------------------------------------------- text


def read_texts(
    sources: Sequence[str], exp: Experiment, corpus_texts: Callable[[], list[str]] | None = None
) -> list[str]:
    """The plain texts of ``mntp.text``: ``corpus`` and/or .txt / .jsonl files or folders of them."""
    texts: list[str] = []
    for source in sources:
        if source == "corpus":
            if corpus_texts is None:
                raise MntpError(f"{exp.source}: mntp.text 'corpus' needs the experiment's corpus")
            texts += corpus_texts()
            continue
        path = exp.resolve_path(source)
        files = (
            sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
            if path.is_dir()
            else [path]
        )
        if not path.exists() or not files:
            raise MntpError(
                f"{exp.source}: mntp.text: {path} has no .txt or .jsonl files (or does not exist)"
            )
        for f in files:
            texts += _read_file(f)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise MntpError(f"{exp.source}: mntp.text gives no text")
    return texts


def _read_file(path: Path) -> list[str]:
    try:
        if path.suffix != ".jsonl":
            return [line.rstrip("\r\n") for _, line in textfiles.lines(path)]
        out = []
        for where, record in textfiles.jsonl(path):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise MntpError(f"{where}: expected a JSON object with a 'text' field")
            out.append(record["text"])
        return out
    except OSError as e:
        raise MntpError(f"{path}: cannot read ({e})") from None
    except textfiles.TextFileError as e:
        raise MntpError(str(e)) from None


def corpus_texts(frame: Any) -> list[str]:
    """Every distinct text of a corpus (queries, positives, negatives), in a fixed order."""
    cols = [
        c for c in ("query", "positive", "neg_1", "neg_2", "neg_3", "neg_4") if c in frame.columns
    ]
    seen: dict[str, None] = {}
    for col in cols:
        for text in frame[col].to_list():
            if text:
                seen.setdefault(text, None)
    return list(seen)


def make_blocks(texts: Iterable[str], tokenizer: Any, max_length: int) -> torch.Tensor:
    """Token ids of the concatenated texts (each with the tokenizer's special tokens), cut into
    blocks of ``max_length`` (the remainder dropped, as LLM2Vec's ``group_texts``; a text shorter
    than one block gives one shorter block)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) < max_length:
        return torch.tensor([ids], dtype=torch.long)
    n = len(ids) // max_length
    return torch.tensor(ids[: n * max_length], dtype=torch.long).view(n, max_length)


def mask_token_id(tokenizer: Any, setting: str | None) -> int:
    """The id that replaces masked tokens: ``setting``, else the tokenizer's mask token, else ``_``."""
    token = setting or tokenizer.mask_token or BLANK_MASK
    ids = tokenizer.convert_tokens_to_ids([token])
    if ids and ids[0] is not None and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(encoded) != 1:
        raise MntpError(f"mntp.mask_token {token!r} is not one token of this tokenizer")
    return int(encoded[0])


def mask_block(
    ids: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels): a ``probability`` share of the non-special tokens replaced by ``mask_id``;
    labels are the original ids there and -100 elsewhere. The first position is never masked: with
    the decoder's shift nothing predicts it."""
    draw = torch.rand(ids.shape, generator=generator) < probability
    draw &= ~special
    draw[:, 0] = False
    inputs = ids.masked_fill(draw, mask_id)
    labels = ids.masked_fill(~draw, -100)
    return inputs, labels


# ---------------------------------------------------------------- training
