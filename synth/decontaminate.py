"""Drop corpus rows that contain a text of an evaluation task: training on a test sentence inflates
the score of the task it comes from (SNLI, the small corpus's pool, shares 54 sentences with
STSBenchmark's test set and 124 with SICK-R's).

A row is contaminated when its query, positive or any negative equals an evaluation text after
normalisation (Unicode NFKC, case-folded, every run of non-alphanumeric characters one space):
"A man is playing a guitar." and "a man is playing a guitar" match. This is exact matching after
normalisation, the floor of decontamination practice (GPT-3 and Llama reports add n-gram overlap);
it cannot catch paraphrases.

The texts come from the caller (``harness/decontamination.py`` reads them from the experiment's
evaluation tasks), keyed by task, so the manifest can say how many rows each task cost.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from synth.corpus import NEG_COLUMNS, Corpus, write_corpus

NORMALIZATION = "nfkc-casefold-nonalnum-collapsed"
TEXT_COLUMNS = ("query", "positive", *NEG_COLUMNS)
RECORD = "decontamination"  # the manifest key
_NON_ALNUM = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    return _NON_ALNUM.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def normalized_set(texts: Collection[str]) -> frozenset[str]:
    """The normalised, non-empty texts of a task."""
    return frozenset(n for n in map(normalize, texts) if n)


@dataclass(frozen=True)
class Contamination:
    keep: pl.Series  # bool per row: no text of the row matches
    dropped: dict[
        str, int
    ]  # task -> rows that match one of its texts (a row may count for several)

    @property
    def rows_dropped(self) -> int:
        return int((~self.keep).sum())


def find(frame: pl.DataFrame, texts_by_task: Mapping[str, frozenset[str]]) -> Contamination:
    """Which rows of ``frame`` hold a text of which task (texts already :func:`normalize`\\ d)."""
    columns = [c for c in TEXT_COLUMNS if c in frame.columns]
    normalized = {c: [normalize(t) if t is not None else "" for t in frame[c]] for c in columns}
    keep = [True] * frame.height
    dropped = {}
    for task, texts in texts_by_task.items():
        hits = 0
        for i in range(frame.height):
            if any(normalized[c][i] in texts for c in columns):
                hits += 1
                keep[i] = False
        dropped[task] = hits
    return Contamination(pl.Series("keep", keep), dropped)


def record(
    contamination: Contamination, tasks: Mapping[str, str], rows_before: int, source_sha256: str
) -> dict[str, Any]:
    """The manifest's ``decontamination`` entry: which task versions were checked, what each cost."""
    return {
        "normalization": NORMALIZATION,
        "tasks": dict(sorted(tasks.items())),  # task -> data revision checked against
        "dropped": dict(sorted(contamination.dropped.items())),
        "rows_before": rows_before,
        "rows_dropped": contamination.rows_dropped,
        "source_sha256": source_sha256,
    }


def checked_tasks(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Task -> revision a corpus was decontaminated against ({} when never)."""
    entry = manifest.get(RECORD)
    if not isinstance(entry, Mapping) or entry.get("normalization") != NORMALIZATION:
        return {}
    tasks = entry.get("tasks")
    return {str(k): str(v) for k, v in tasks.items()} if isinstance(tasks, Mapping) else {}


def decontaminate(
    corpus: Corpus,
    texts_by_task: Mapping[str, frozenset[str]],
    revisions: Mapping[str, str],
    out: Path,
) -> tuple[Corpus, Contamination]:
    """Write ``corpus`` without its contaminated rows to ``out`` (which may be the corpus's own
    folder when the caller built it), keeping its manifest's build, usage and other entries and
    adding the ``decontamination`` record. A corpus checked before keeps the tasks it was checked
    against in the record, with their counts."""
    found = find(corpus.frame, texts_by_task)
    manifest = dict(corpus.manifest)
    earlier = manifest.get(RECORD) if checked_tasks(manifest) else None
    entry = record(found, revisions, len(corpus), corpus.sha256)
    if isinstance(earlier, Mapping):  # checked again against more tasks: the history adds up
        entry["tasks"] = dict(sorted({**earlier["tasks"], **entry["tasks"]}.items()))
        dropped = {**earlier.get("dropped", {})}
        for task, n in found.dropped.items():
            dropped[task] = dropped.get(task, 0) + n
        entry["dropped"] = dict(sorted(dropped.items()))
        entry["rows_before"] = earlier.get("rows_before", len(corpus))
        entry["rows_dropped"] = earlier.get("rows_dropped", 0) + found.rows_dropped
        entry["source_sha256"] = earlier.get("source_sha256", corpus.sha256)
    skip = {"name", "created", "format_version", "build", "counts", "usage", "samples_sha256"}
    extra = {k: v for k, v in manifest.items() if k not in skip}
    extra[RECORD] = entry
    written = write_corpus(
        corpus.frame.filter(found.keep),
        out,
        name=manifest.get("name"),
        build=manifest.get("build"),
        usage=manifest.get("usage"),
        extra=extra,
    )
    return written, found
