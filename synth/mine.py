"""``synth mine``: a graded corpus mined from existing (query, positive[, negative]) pairs.

For every pair, four negatives are drawn from a candidate pool by how similar an embedding model
finds them to the query: level 1 from the nearest candidates (hardest), level 4 from far down the
ranking (easy, but still the same domain, since the pool is the data set's own texts). This gives a
real graded corpus offline, and mined vs synthesized levels is itself an ablation axis.

How it decides, per source (sources never share a pool):

- The pool is every positive and every given negative of the source (a data set's own negative is
  a candidate like any other, so it lands at the level its similarity earns), plus the whole
  document collection for BEIR folders.
- Candidates that can never be a negative of a pair: the query's own positives (all of them, for
  queries with several) and the query text itself.
- Likely false negatives are skipped: candidates whose similarity to the query is at or above the
  pair's positive score minus ``relative_margin`` times its magnitude (as ``relative_margin`` in
  ``sentence_transformers.util.mine_hard_negatives``).
- The remaining candidates are ranked by similarity to the query (rank 1 = nearest); level ``i``
  takes one candidate drawn uniformly from its band of ranks, e.g. ranks 1-10 for level 1. A band
  past the end of a small pool leaves that level empty (null).

Every unique text is encoded once; scores come from chunked matrix products. Given the same
config (and seed) the corpus, and so its sha256, is the same.

Not ``sentence_transformers.util.mine_hard_negatives``: it takes one rank range a call, so four
levels would be four calls and four rankings of the pool, and it has no per-source pools and no
notion of a data set's own negative competing with the mined ones; its false-negative rule
(``relative_margin``) is the one used here.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console

from synth import outputs
from synth.corpus import LEVELS, Corpus, RowBuilder, write_corpus
from synth.embed import encode, load_encoder
from synth.mine_config import MineConfig, MineError, SourceConfig
from synth.sources import Columns, Pair, PairSet, SourceError, read_hub, read_local

COMMAND = "synth mine"  # what outputs.MARKER records

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 0.1 else f"{1000 * seconds:.0f} ms"


def read_source(source: SourceConfig) -> PairSet:
    columns = Columns(**source.columns.model_dump())
    if source.hf is not None:
        return read_hub(source.hf, source.subset, source.split, columns)
    return read_local(Path(str(source.path)), source.split, columns)


def select_pairs(pairs: Sequence[Pair], max_rows: int | None, seed: int) -> list[Pair]:
    """Drop repeated (query, positive) pairs and pairs whose positive is the query; then sample."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for p in pairs:
        if p.query != p.positive and (p.query, p.positive) not in seen:
            seen.add((p.query, p.positive))
            unique.append(p)
    if max_rows is None or len(unique) <= max_rows:
        return unique
    keep = sorted(random.Random(seed).sample(range(len(unique)), max_rows))
    return [unique[i] for i in keep]


def pick_negatives(
    query_emb: torch.Tensor,
    pool_emb: torch.Tensor,
    positive_scores: torch.Tensor,
    excluded: Sequence[Sequence[int]],
    *,
    bands: Sequence[tuple[int, int]],
    relative_margin: float,
    uniforms: torch.Tensor,
    max_cells: int = 1 << 25,
) -> tuple[torch.Tensor, int]:
    """Pool indices of one negative per band for each query row (-1 where a band is empty).

    ``query_emb`` (R, D) and ``pool_emb`` (P, D) are normalized; ``positive_scores`` (R,) is each
    row's query-positive cosine; ``excluded[r]`` lists pool indices never allowed for row r;
    ``uniforms`` (R, len(bands)) in [0, 1) picks within each band (seeded by the caller, so the
    result does not depend on the chunking). Also returns how many candidates were skipped as
    likely false negatives. Rows are scored in chunks of at most ``max_cells`` scores.
    """
    rows, pool = query_emb.shape[0], pool_emb.shape[0]
    k = min(bands[-1][1], pool)
    choice = torch.full((rows, len(bands)), -1, dtype=torch.long)
    skipped = 0
    step = max(1, max_cells // max(pool, 1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        scores = query_emb[start:stop] @ pool_emb.T
        blocked = torch.zeros_like(scores, dtype=torch.bool)
        r = [i - start for i in range(start, stop) for _ in excluded[i]]
        c = [j for i in range(start, stop) for j in excluded[i]]
        blocked[r, c] = True
        pos = positive_scores[start:stop, None]
        too_close = (scores >= pos - relative_margin * pos.abs()) & ~blocked
        skipped += int(too_close.sum())
        scores.masked_fill_(blocked | too_close, float("-inf"))
        top = scores.topk(k, dim=1)
        valid = torch.isfinite(top.values).sum(dim=1)
        for level, (first, last) in enumerate(bands):
            available = (valid - (first - 1)).clamp(0, last - first + 1)
            offset = (uniforms[start:stop, level] * available).long()
            rank = (first - 1 + offset).clamp(max=k - 1)
            picked = top.indices.gather(1, rank[:, None]).squeeze(1)
            choice[start:stop, level] = torch.where(available > 0, picked, -1)
    return choice, skipped


def _unique(texts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def mine_source(
    source: SourceConfig,
    config: MineConfig,
    model: SentenceTransformer,
    builder: RowBuilder,
    generator: torch.Generator,
    *,
    console: Console,
    progress: bool,
    warn: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Mine one source into ``builder``; return its statistics for the manifest."""
    started = time.perf_counter()
    pair_set = read_source(source)
    pairs = select_pairs(pair_set.pairs, source.max_rows, config.seed)
    pool = _unique(
        [
            *(p.positive for p in pairs),
            *(p.negative for p in pairs if p.negative),
            *pair_set.documents,
        ]
    )
    texts = _unique([*(p.query for p in pairs), *pool])
    console.print(
        f"[bold]{source.label}[/bold]: {len(pairs):,} pairs, {len(pool):,} candidates, "
        f"{len(texts):,} texts to embed"
    )
    emb = encode(
        model,
        texts,
        batch_size=config.batch_size,
        description=f"embedding {source.label}",
        progress=progress,
    )
    embedded = time.perf_counter()
    index = {t: i for i, t in enumerate(texts)}
    pool_index = {t: i for i, t in enumerate(pool)}
    positives: dict[str, list[int]] = {}
    for p in pairs:
        positives.setdefault(p.query, []).append(pool_index[p.positive])
    excluded = [
        positives[p.query] + ([pool_index[p.query]] if p.query in pool_index else []) for p in pairs
    ]
    query_emb = emb[[index[p.query] for p in pairs]]
    positive_scores = (query_emb * emb[[index[p.positive] for p in pairs]]).sum(dim=1)
    pool_emb = emb[[index[t] for t in pool]]
    uniforms = torch.rand(len(pairs), len(LEVELS), generator=generator)
    choice, skipped = pick_negatives(
        query_emb,
        pool_emb,
        positive_scores,
        excluded,
        bands=config.bands,
        relative_margin=config.relative_margin,
        uniforms=uniforms,
    )
    for pair, picks in zip(pairs, choice.tolist()):
        builder.add(
            source=source.label,
            task_kind=source.task_kind,
            subtask=source.label,
            instruction=source.resolved_instruction,
            query=pair.query,
            positive=pair.positive,
            negatives=[pool[j] if j >= 0 else None for j in picks],
        )
    done = time.perf_counter()
    filled = (choice >= 0).sum(dim=0).tolist()
    console.print(
        f"  negatives picked in {_duration(done - embedded)}; per level {filled}; "
        f"{skipped:,} candidates skipped as likely false negatives"
    )
    for level, count in zip(LEVELS, filled):
        if count < len(pairs):  # a schedule falls back to the nearest level for these rows
            first, last = config.bands[level - 1]
            (warn or console.print)(
                f"  [yellow]warning:[/] level {level}: {len(pairs) - count:,} of {len(pairs):,} pairs "
                f"have no negative (ranks {first}-{last} of a pool of {len(pool):,} candidates, "
                "less those skipped as likely false negatives); training uses the nearest level there",
                highlight=False,
            )
    return {
        "name": source.label,
        "origin": pair_set.origin,
        "split": source.split,
        "task_kind": source.task_kind,
        "instruction": source.resolved_instruction,
        "pairs": len(pairs),
        "candidates": len(pool),
        "negatives_per_level": dict(zip((f"neg_{lv}" for lv in LEVELS), filled)),
        "missing_per_level": {f"neg_{lv}": len(pairs) - n for lv, n in zip(LEVELS, filled)},
        "skipped_false_negatives": skipped,
        "texts_embedded": len(texts),
        "seconds": {
            "read_and_embed": round(embedded - started, 2),
            "mine": round(done - embedded, 2),
        },
    }


def mine(
    config: MineConfig,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    console: Console | None = None,
    force: bool = False,
) -> Corpus:
    """Mine every source of ``config`` into one corpus at ``out``; return the written corpus.
    Progress goes to ``console`` (stderr by default) unless ``progress`` is off; warnings always.
    ``force`` replaces a corpus this command wrote at ``out`` (synth/outputs.py)."""
    inputs = [s.path for s in config.sources if s.path is not None]
    out = outputs.check_output(out, COMMAND, inputs=inputs, force=force)  # before the model loads
    warn = (console or Console(stderr=True)).print
    console = (
        console if console is not None and progress else Console(stderr=True, quiet=not progress)
    )
    started = time.perf_counter()
    model = load_encoder(config.model, config.max_seq_length)
    loaded = time.perf_counter()
    builder = RowBuilder()
    generator = torch.Generator().manual_seed(config.seed)
    try:
        sources = [
            mine_source(
                s, config, model, builder, generator, console=console, progress=progress, warn=warn
            )
            for s in config.sources
        ]
    except SourceError as e:
        raise MineError(str(e)) from None
    build = {
        "kind": "mine",
        "model": config.model,
        "max_seq_length": model.max_seq_length,
        "bands": {f"level_{lv}": list(b) for lv, b in zip(LEVELS, config.bands)},
        "relative_margin": config.relative_margin,
        "seed": config.seed,
        "sources": sources,
        "load_model_seconds": round(loaded - started, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }
    with outputs.replacing(out, COMMAND, inputs=inputs, force=force) as staging:
        corpus = write_corpus(builder.frame(), staging, name=config.name or out.name, build=build)
    corpus = dataclasses.replace(corpus, path=out)
    console.print(f"wrote {len(corpus):,} rows to {out} in {build['seconds']:.1f} s")
    return corpus
