"""``synth verify``: teacher-verified negative levels.

Graded levels are only as good as the model that wrote them (a small generator's levels do not fall;
a strong one's are never checked per example). A teacher embedder scores every negative of a row
against its query, as the audit does (cosine of L2-normalized embeddings), and:

1. drops likely false negatives: a negative scored at or above the positive, or within
   ``relative_margin`` of it (``score >= pos - relative_margin * |pos|``, the rule of
   ``synth mine`` and of ``sentence_transformers.util.mine_hard_negatives``);
2. then, by ``mode``:

   - ``reorder``: the remaining negatives are sorted by teacher score into levels 1, 2, ...: level
     *j* is the *j*-th hardest negative the teacher keeps, so a row that lost negatives lacks its
     easiest levels (the trainer then takes the nearest level it has). Keeping the slots the
     dropped negatives left would mix hard and easy negatives within a level across rows (seen on
     the offline SmolLM2 corpus: its level means did not fall);
   - ``reject``: the order is kept, and a row is rejected when the teacher contradicts it by more
     than ``tolerance``: some harder level scores more than ``tolerance`` below an easier one.

A row left without any negative is rejected (it cannot teach a level). Kept rows keep their ``id``
(it names the example, so a verified corpus lines up row for row with its source) and record what
was done in the optional ``verify_*`` columns of the corpus contract (the original negatives, the
teacher scores); rejected rows go to ``rejects.parquet`` with their reason. :func:`undo_verify`
rebuilds the source corpus from both (the same rows, so the same hash when
written by the same polars version). The manifest's ``build`` counts every change
by reason and records the per-level audit before and after, with the teacher's embeddings.

In ``reorder`` mode the teacher's own audit of the result falls within every row by construction
(and across rows for rows that keep all four levels); what it shows is how much had to change. An
independent scorer (another model, or a trained harness model through ``harness audit``) is the fair
check of the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch

from synth import outputs
from synth.audit import level_similarities, text_embeddings
from synth.corpus import (
    LEVELS,
    NEG_COLUMNS,
    SCHEMA,
    SYNTHETIC_SOURCE,
    VERIFY_COLUMNS,
    Corpus,
    CorpusError,
    read_corpus,
    samples_bytes,
    write_corpus,
)
from synth.embed import DEFAULT_ENCODER, encode, load_encoder

Mode = Literal["reorder", "reject"]
Rows = Literal["all", "synthetic"]
MODES: tuple[Mode, ...] = ("reorder", "reject")
REJECTS_FILE = "rejects.parquet"
REPORT_FILE = "verify.md"
COMMAND, UNDO_COMMAND = "synth verify", "synth verify --undo"  # what outputs.MARKER records

# Reject reasons (counted in the manifest).
NO_NEGATIVE_LEFT = "no_negative_left"  # every negative was a likely false negative (or none)
ORDER_CONTRADICTED = "order_contradicted"  # reject mode: the teacher disagrees beyond tolerance


class VerifyError(ValueError):
    """Bad verify arguments or input; the message says which."""


@dataclass(frozen=True)
class Settings:
    """How to verify (``relative_margin`` as in mining; ``tolerance`` in cosine units)."""

    mode: Mode = "reorder"
    model: str = DEFAULT_ENCODER
    relative_margin: float = 0.05
    tolerance: float = 0.05
    rows: Rows = "all"
    batch_size: int = 64

    def check(self) -> None:
        if self.mode not in MODES:
            raise VerifyError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if not 0 <= self.relative_margin < 1:
            raise VerifyError(f"--relative-margin {self.relative_margin}: expected 0 <= m < 1")
        if self.tolerance < 0:
            raise VerifyError(f"--tolerance {self.tolerance}: expected >= 0")
        if self.rows not in ("all", "synthetic"):
            raise VerifyError(f"--rows {self.rows!r}: expected all or synthetic")
        if self.batch_size < 1:  # 0 encoded nothing and reported every row rejected
            raise VerifyError(f"--batch-size {self.batch_size}: expected >= 1")


@dataclass(frozen=True)
class Decision:
    """What verification does to one row: its new negatives (by level) or why it is rejected."""

    negatives: tuple[str | None, ...]
    dropped: tuple[int, ...]  # levels whose negative was a likely false negative
    reason: str | None = None  # set when the row is rejected


def decide(
    negatives: tuple[str | None, ...],
    scores: tuple[float | None, ...],
    positive: float,
    settings: Settings,
) -> Decision:
    """The decision for one row, given its negatives and their teacher scores (level order)."""
    bound = positive - settings.relative_margin * abs(positive)
    kept = [
        (level, text, score)
        for level, text, score in zip(LEVELS, negatives, scores)
        if text is not None and score is not None and score < bound
    ]
    dropped = tuple(
        level
        for level, text, score in zip(LEVELS, negatives, scores)
        if text is not None and (score is None or score >= bound)
    )
    if not kept:
        return Decision(negatives, dropped, NO_NEGATIVE_LEFT)
    out: list[str | None] = [None] * len(LEVELS)
    if settings.mode == "reorder":  # the j-th hardest negative the teacher keeps is level j
        for slot, (_, text, _) in enumerate(sorted(kept, key=lambda k: -k[2])):
            out[slot] = text
        return Decision(tuple(out), dropped)
    for (_, _, harder), (_, _, easier) in combinations(kept, 2):
        if easier > harder + settings.tolerance:
            return Decision(negatives, dropped, ORDER_CONTRADICTED)
    for level, text, _ in kept:
        out[level - 1] = text
    return Decision(tuple(out), dropped)


def _scores(frame: pl.DataFrame, emb: torch.Tensor, index: dict[str, int]) -> pl.DataFrame:
    """``frame`` with the teacher's ``verify_positive`` and ``verify_scores`` (level order)."""
    rows = text_embeddings(frame, emb, index)
    positive = (rows.query * rows.positive).sum(dim=1)
    per_level = torch.stack([(rows.query * rows.negatives[c]).sum(dim=1) for c in NEG_COLUMNS], 1)
    present = frame.select(pl.col(c).is_not_null() for c in NEG_COLUMNS).to_torch().bool()
    scores = [
        [round(float(s), 6) if p else None for s, p in zip(row, mask)]
        for row, mask in zip(per_level.tolist(), present.tolist())
    ]
    return frame.with_columns(
        pl.Series("verify_positive", [round(float(p), 6) for p in positive], pl.Float64()),
        pl.Series("verify_scores", scores, pl.List(pl.Float64())),
    )


def verify_corpus(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: Settings = Settings(),
    *,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
    force: bool = False,
) -> Corpus:
    """Verify the corpus at ``source`` into ``out`` (see the module docstring); return it.
    ``force`` replaces a folder this command wrote at ``out`` (synth/outputs.py)."""
    settings.check()
    out = outputs.check_output(out, COMMAND, inputs=[source], force=force)
    started = time.perf_counter()
    corpus = read_corpus(source)
    if "verify_original" in corpus.frame.columns:
        raise VerifyError(
            f"{source}: already verified (it has verify_* columns); verify its source instead"
        )
    frame = corpus.frame
    selected = (
        pl.col("source") == SYNTHETIC_SOURCE if settings.rows == "synthetic" else pl.lit(True)
    )
    chosen, passed = frame.filter(selected), frame.filter(~selected)
    if chosen.height == 0:
        raise VerifyError(f"{source}: no {settings.rows} rows to verify")
    texts = list(
        dict.fromkeys(
            t for col in ("query", "positive", *NEG_COLUMNS) for t in chosen[col].drop_nulls()
        )
    )
    log(f"scoring {chosen.height:,} rows ({len(texts):,} distinct texts) with {settings.model}")
    emb = encode(
        load_encoder(settings.model),
        texts,
        batch_size=settings.batch_size,
        description="teacher",
        progress=progress,
    )
    index = {t: i for i, t in enumerate(texts)}
    scored = _scores(chosen, emb, index)

    kept_rows: list[dict[str, Any]] = []
    rejected_rows: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    dropped: Counter[int] = Counter()
    reordered = 0
    for row in scored.iter_rows(named=True):
        negatives = tuple(row[c] for c in NEG_COLUMNS)
        decision = decide(negatives, tuple(row["verify_scores"]), row["verify_positive"], settings)
        dropped.update(decision.dropped)
        if decision.reason is not None:
            reasons[decision.reason] += 1
            rejected_rows.append({**row, "reason": decision.reason})
            continue
        kept_order = [
            t for lv, t in zip(LEVELS, negatives) if t is not None and lv not in decision.dropped
        ]
        reordered += [t for t in decision.negatives if t is not None] != kept_order
        kept_rows.append(
            {
                **row,
                **dict(zip(NEG_COLUMNS, decision.negatives)),
                "verify_original": list(negatives),
            }
        )

    kept = pl.DataFrame(kept_rows, schema={**SCHEMA, **VERIFY_COLUMNS}) if kept_rows else None
    if kept is None or kept.height + passed.height == 0:
        raise CorpusError(f"{source}: verification rejected every row ({dict(reasons)})")
    result = pl.concat([kept, passed], how="diagonal_relaxed")
    before = level_similarities(chosen, text_embeddings(chosen, emb, index))
    after = level_similarities(kept, text_embeddings(kept, emb, index))
    build = {
        "kind": "verify",
        "source": {
            "name": corpus.name,
            "path": str(Path(source).resolve()),
            "samples_sha256": corpus.sha256,
            "rows": len(corpus),
            "build_kind": corpus.manifest.get("build", {}).get("kind"),
        },
        "mode": settings.mode,
        "model": settings.model,
        "relative_margin": settings.relative_margin,
        "tolerance": settings.tolerance if settings.mode == "reject" else None,
        "rows": settings.rows,
        "counts": {
            "rows_verified": chosen.height,
            "rows_passed_through": passed.height,
            "rows_kept": kept.height,
            "rows_rejected": dict(sorted(reasons.items())),
            "rows_reordered": reordered,
            "false_negatives_dropped": {str(lv): dropped[lv] for lv in LEVELS},
        },
        "audit_before": _summary(before),
        "audit_after": _summary(after),
        "seconds": round(time.perf_counter() - started, 2),
    }
    rejects = pl.DataFrame(
        rejected_rows,
        schema={**SCHEMA, "verify_positive": pl.Float64(), "verify_scores": pl.List(pl.Float64())}
        | {"reason": pl.String()},
    )
    with outputs.replacing(out, COMMAND, inputs=[source], force=force) as staging:
        written = write_corpus(result, staging, name=f"{corpus.name}-verified", build=build)
        rejects.sort("id").write_parquet(staging / REJECTS_FILE)
        (staging / REPORT_FILE).write_text(render_report(build), encoding="utf-8")
    return dataclasses.replace(written, path=out)


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The audit figures the manifest keeps: per level n, mean cos to the query, share above the
    positive; Spearman; whether the means fall."""
    return {
        "rows": stats["rows"],
        "levels": {
            lv: {
                "count": s["count"],
                "query_mean": s["query"]["mean"],
                "above_positive": s["above_positive"],
            }
            for lv, s in stats["levels"].items()
        },
        "spearman_query": stats["spearman_query"],
        "monotone_query": stats["monotone_query"],
    }


def render_report(build: dict[str, Any]) -> str:
    """``verify.md``: what verification changed, and the teacher's audit before and after."""
    counts = build["counts"]
    rejected = ", ".join(f"{n:,} {r}" for r, n in counts["rows_rejected"].items()) or "none"
    mode = build["mode"] + (
        f", tolerance {build['tolerance']}" if build["mode"] == "reject" else ""
    )
    lines = [
        f"# Verification of corpus `{build['source']['name']}`",
        "",
        f"Teacher `{build['model']}`, mode {mode}, relative margin {build['relative_margin']}, "
        f"rows: {build['rows']}. Source sha256 `{build['source']['samples_sha256'][:12]}…`.",
        "",
        f"- rows verified: {counts['rows_verified']:,}; kept {counts['rows_kept']:,}; "
        f"rejected: {rejected}; passed through unverified: {counts['rows_passed_through']:,}",
        f"- rows whose negatives were re-ordered: {counts['rows_reordered']:,}",
        "- likely false negatives dropped, by original level: "
        + ", ".join(f"{lv}: {n:,}" for lv, n in counts["false_negatives_dropped"].items()),
        "",
        "| audit (teacher) | rows | "
        + " | ".join(f"level {lv}" for lv in LEVELS)
        + " | Spearman | falls |",
        "|---|---:|" + "---:|" * len(LEVELS) + "---:|---|",
    ]
    for name in ("before", "after"):
        audit = build[f"audit_{name}"]
        cells = []
        for lv in LEVELS:
            s = audit["levels"].get(str(lv))
            cells.append(
                "-"
                if s is None
                else f"{s['query_mean']:.3f} (n {s['count']:,}, {100 * s['above_positive']:.0f}% > pos)"
            )
        lines.append(
            f"| {name} | {audit['rows']:,} | "
            + " | ".join(cells)
            + f" | {audit['spearman_query']} | {'yes' if audit['monotone_query'] else 'NO'} |"
        )
    lines += [
        "",
        "Cells: mean cosine of the level's negatives to the query (n, share scored above the "
        "positive). In reorder mode the teacher's own audit falls within each row by construction; "
        "audit the result with an independent model for a fair check.",
    ]
    return "\n".join(lines) + "\n"


def undo_verify(
    verified: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False
) -> Corpus:
    """The source of a verified corpus, rebuilt from its kept rows (original negatives restored)
    and ``rejects.parquet``. The rebuilt rows must be the source's, checked against the row count
    and ``samples_sha256`` the manifest recorded (so the same polars version must write both);
    anything else is refused and nothing is written. ``force`` replaces a folder this command
    wrote at ``out``."""
    out = outputs.check_output(out, UNDO_COMMAND, inputs=[verified], force=force)
    corpus = read_corpus(verified)
    build = corpus.manifest.get("build", {})
    rejects_file = Path(verified) / REJECTS_FILE
    source = build.get("source") if isinstance(build, dict) else None
    if build.get("kind") != "verify" or not rejects_file.is_file() or not isinstance(source, dict):
        raise VerifyError(f"{verified}: not a corpus written by synth verify (no {REJECTS_FILE})")
    frame = corpus.frame
    restored = frame.with_columns(
        pl.when(pl.col("verify_original").is_not_null())
        .then(pl.col("verify_original").list.get(i, null_on_oob=True))
        .otherwise(pl.col(col))
        .alias(col)
        for i, col in enumerate(NEG_COLUMNS)
    ).select(list(SCHEMA))
    try:
        rejects = pl.read_parquet(rejects_file).select(list(SCHEMA))
        whole = pl.concat([restored, rejects])
    except Exception as e:  # polars raises several types for truncated/corrupt files
        first = str(e).splitlines()[0] if str(e) else ""
        raise VerifyError(
            f"{rejects_file}: cannot be read as the rejected rows ({type(e).__name__}: {first}); "
            "nothing written"
        ) from None
    try:
        whole, data = samples_bytes(whole, where=str(rejects_file))
    except CorpusError as e:  # a row twice, a missing text: not the source's rows
        raise VerifyError(f"{verified}: cannot rebuild the source: {e}; nothing written") from None
    digest = hashlib.sha256(data).hexdigest()
    rows, expected = source.get("rows"), str(source.get("samples_sha256"))
    if whole.height != rows or digest != expected:
        raise VerifyError(
            f"{verified}: the rebuilt source has {whole.height} rows, sha256 {digest[:12]}…, but "
            f"the manifest recorded {rows} rows, sha256 {expected[:12]}… ({REJECTS_FILE} changed "
            "after synth verify wrote it, or another polars version wrote the source); nothing written"
        )
    with outputs.replacing(out, UNDO_COMMAND, inputs=[verified], force=force) as staging:
        written = write_corpus(
            whole,
            staging,
            name=source.get("name"),
            build={
                "kind": "verify-undo",
                "verified": str(Path(verified).resolve()),
                "source": source,
            },
        )
    return dataclasses.replace(written, path=out)
