"""Sentence embeddings for mining and the audit.

Both need the same thing: every unique text encoded once with a sentence-transformers model,
L2-normalized (so a dot product is the cosine), with visible progress on long inputs. The model is
loaded once per process and name, which also keeps the test suite from reloading it per test.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from synth.packaged import no_progress_bars, resolve

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_ENCODER = "packaged:all-minilm-l6-v2"


@lru_cache(maxsize=4)
def load_encoder(
    name: str = DEFAULT_ENCODER, max_seq_length: int | None = None
) -> SentenceTransformer:
    """A sentence-transformers model by Hub id, local folder or ``packaged:`` name (cached)."""
    from sentence_transformers import SentenceTransformer

    with no_progress_bars():  # the per-tensor "Loading weights" bar is noise here
        model = SentenceTransformer(resolve(name))
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


def encode(
    model: SentenceTransformer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    description: str = "embedding",
    progress: bool = True,
) -> torch.Tensor:
    """Normalized embeddings ``(len(texts), dim)``, float32 on CPU, in the order of ``texts``.

    Texts are encoded longest first in chunks of a few batches, so batches pad little and the
    progress bar moves at a steady pace (sentence-transformers sorts only within one call).
    """
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(len(texts), model.get_embedding_dimension(), dtype=torch.float32)
    chunk = batch_size * 4
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    started = time.perf_counter()
    reported = 0
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task(description, total=len(texts))
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            with torch.inference_mode():
                emb = model.encode(
                    [texts[i] for i in idx],
                    batch_size=batch_size,
                    convert_to_tensor=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )
            out[idx] = emb.float().cpu()
            bar.advance(task, len(idx))
            done = start + len(idx)
            # A bar draws nothing into a log file: write a line per tenth of the work there.
            if progress and not console.is_terminal and done - reported >= len(texts) / 10:
                reported = done
                rate = done / (time.perf_counter() - started)
                console.print(
                    f"{description}: {done:,}/{len(texts):,} texts, {rate:.0f}/s, "
                    f"{(len(texts) - done) / rate:.0f} s left"
                )
    return out


@lru_cache(maxsize=1 << 16)
def _embedding(model: str, text: str) -> torch.Tensor:
    """One text's normalized embedding (cached: a text is checked again on every resume)."""
    with torch.inference_mode():
        return (
            load_encoder(model)
            .encode(
                text, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
            )
            .float()
            .cpu()
        )


def closest(model: str, text: str, phrases: Sequence[str]) -> tuple[float, str]:
    """The highest cosine between ``text`` and one of ``phrases``, and that phrase."""
    query = _embedding(model, text)
    scores = [float(query @ _embedding(model, p)) for p in phrases]
    best = max(range(len(phrases)), key=scores.__getitem__)
    return scores[best], phrases[best]
