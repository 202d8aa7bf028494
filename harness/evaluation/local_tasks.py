"""Local folders as mteb tasks, scored by mteb's own evaluators, fully offline.

Five layouts (see ``shared/data/README.md``):

- retrieval (BEIR): ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``,
  ``text``), ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score``, with a header);
- STS: ``<split>.tsv`` with ``sentence1``, ``sentence2``, ``score`` (tab-separated, no quoting);
- classification: ``train.jsonl`` and ``<split>.jsonl`` with ``text``, ``label``;
- pair classification: ``<split>.jsonl`` with ``sentence1``, ``sentence2``, ``label`` (0/1);
- reranking: ``<split>_reranking.jsonl`` with ``query`` and lists ``positive``, ``negative``: each
  query's candidates are its positives and negatives (mteb v2 scores reranking as retrieval
  restricted to those ``top_ranked`` candidates).

``max_examples`` caps what is evaluated, for CPU-sized suites: STS and pair-classification pairs,
classification test texts (the training texts mteb samples from stay whole), retrieval and
reranking queries (with only the documents they need, and ``max_docs`` others). The sample is a
fixed pseudo-random one (seed 0), and the task's ``note`` says so: a capped task's score estimates
the full task's, it is not mteb's number for it.

A folder named like an mteb task (``STSBenchmark``, ``SciFact``, ``Banking77Classification``...)
becomes a subclass of that very task: same main score, splits, score range, sampling and evaluator,
so its score is the score mteb reports on the Hub version of the same data. Only the data source
changes (``dataset.revision`` becomes ``local-<sha of the files>``). Other folders get generic
metadata: main score ndcg_at_10 / cosine_spearman / accuracy, split ``test``.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import mteb
from datasets import Dataset, DatasetDict
from mteb.abstasks import (
    AbsTaskClassification,
    AbsTaskPairClassification,
    AbsTaskRetrieval,
    AbsTaskSTS,
)
from mteb.abstasks.abstask import AbsTask
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata

from synth import textfiles

log = logging.getLogger(__name__)

Kind = Literal["Retrieval", "Reranking", "STS", "Classification", "PairClassification"]
# base class, main score (mteb v2's for the type), category
_GENERIC: dict[Kind, tuple[type[AbsTask], str, str]] = {
    "Retrieval": (AbsTaskRetrieval, "ndcg_at_10", "t2t"),
    "Reranking": (AbsTaskRetrieval, "map_at_1000", "t2t"),
    "STS": (AbsTaskSTS, "cosine_spearman", "t2t"),
    "Classification": (AbsTaskClassification, "accuracy", "t2c"),
    "PairClassification": (AbsTaskPairClassification, "max_ap", "t2t"),
}
LAYOUTS = (
    "retrieval: corpus.jsonl + queries.jsonl + qrels/test.tsv; "
    "reranking: test_reranking.jsonl (query, positive[], negative[]); "
    "STS: test.tsv (sentence1, sentence2, score); "
    "classification: train.jsonl + test.jsonl (text, label); "
    "pair classification: test.jsonl (sentence1, sentence2, label)"
)
SAMPLE_SEED = 0


class LocalTaskError(ValueError):
    """A local task folder is missing or malformed; the message names the folder and the file."""


def detect_kind(folder: Path) -> Kind:
    if (folder / "corpus.jsonl").is_file() and (folder / "queries.jsonl").is_file():
        return "Retrieval"
    if (folder / "test_reranking.jsonl").is_file():
        return "Reranking"
    if (folder / "test.jsonl").is_file() and "sentence1" in _first_row(folder / "test.jsonl"):
        return "PairClassification"
    if (folder / "train.jsonl").is_file() and (folder / "test.jsonl").is_file():
        return "Classification"
    if (folder / "test.tsv").is_file():
        return "STS"
    raise LocalTaskError(f"{folder}: not a task folder; expected one of these layouts: {LAYOUTS}")


def load_local_task(
    folder: str | Path, *, max_docs: int | None = None, max_examples: int | None = None
) -> AbsTask:
    """An mteb task reading ``folder`` (lazily, when mteb asks for the data).

    ``max_docs`` caps a retrieval corpus: every document relevant to an evaluated query is kept,
    plus a fixed random sample of the others. ``max_examples`` caps the evaluated examples (see the
    module docstring). The task's ``note`` says what was capped.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LocalTaskError(f"{folder}: task folder not found ({LAYOUTS})")
    kind = detect_kind(folder)
    base, metadata = _base_task(folder, kind)
    cls = type(f"Local{base.__name__}", (LocalFolderTask, base), {"metadata": metadata})
    task = cls()
    task.folder = folder
    task.max_docs = max_docs if kind == "Retrieval" else None
    task.max_examples = max_examples
    return task


def _base_task(folder: Path, kind: Kind) -> tuple[type[AbsTask], TaskMetadata]:
    """The mteb task class named like the folder (if any) and metadata pointing at the folder."""
    dataset = {"path": str(folder.resolve()), "revision": f"local-{_fingerprint(folder)}"}
    try:
        known = type(mteb.get_task(folder.name))
    except KeyError:
        known = None
    if known is None:
        base, main_score, category = _GENERIC[kind]
        metadata = TaskMetadata(
            name=folder.name,
            description=f"Local {kind} task read from {folder}.",
            dataset=dataset,
            type=kind,
            category=category,
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score=main_score,
        )
        return base, metadata
    if known.metadata.type != kind:
        raise LocalTaskError(
            f"{folder}: the folder holds a {kind} task, but mteb's task {folder.name!r} is "
            f"{known.metadata.type}; rename the folder to score it as a new task"
        )
    if known.metadata.is_multilingual:
        raise LocalTaskError(
            f"{folder}: mteb's {folder.name!r} is multilingual; local folders hold one language"
        )
    if known.dataset_transform is not AbsTask.dataset_transform:
        log.warning(
            "%s: mteb transforms the Hub data of %s; the folder is read as already transformed",
            folder,
            folder.name,
        )
    return known, known.metadata.model_copy(update={"dataset": dataset})


class LocalFolderTask:
    """Mixed in before an mteb task class: ``load_data`` reads the folder instead of the Hub."""

    folder: Path
    max_docs: int | None
    max_examples: int | None = None
    note: str = ""
    dataset: Any
    data_loaded: bool
    metadata: TaskMetadata
    eval_splits: list[str]

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        kind = self.metadata.type
        if kind == "Retrieval":
            self.dataset = {"default": self._read_retrieval()}
        elif kind == "Reranking":
            self.dataset = {"default": {s: self._read_reranking(s) for s in self.eval_splits}}
        elif kind == "STS":
            self.dataset = DatasetDict({split: self._read_sts(split) for split in self.eval_splits})
        elif kind == "PairClassification":
            self.dataset = DatasetDict({s: self._read_pairs(s) for s in self.eval_splits})
        else:
            splits = {getattr(self, "train_split", "train"), *self.eval_splits}
            self.dataset = DatasetDict(self._read_classification(sorted(splits)))
        self.data_loaded = True

    # -- STS
    def _capped(self, rows: list[Any], what: str) -> list[Any]:
        """A fixed pseudo-random sample of ``max_examples`` rows, in their file order."""
        if self.max_examples is None or len(rows) <= self.max_examples:
            return rows
        keep = sorted(random.Random(SAMPLE_SEED).sample(range(len(rows)), self.max_examples))
        self.note = _join(self.note, f"{self.max_examples} of {len(rows)} {what} (seeded sample)")
        return [rows[i] for i in keep]

    def _read_sts(self, split: str) -> Dataset:
        path = self.folder / f"{split}.tsv"
        rows = self._capped(_read_tsv(path, ("sentence1", "sentence2", "score")), "pairs")
        try:
            scores = [float(r["score"]) for r in rows]
        except ValueError as e:
            raise LocalTaskError(f"{path}: score column is not a number ({e})") from None
        return Dataset.from_dict(
            {
                "sentence1": [r["sentence1"] for r in rows],
                "sentence2": [r["sentence2"] for r in rows],
                "score": scores,
            }
        )

    # -- pair classification
    def _read_pairs(self, split: str) -> Dataset:
        path = self.folder / f"{split}.jsonl"
        rows = self._capped(_read_jsonl(path, ("sentence1", "sentence2", "label")), "pairs")
        bad = sorted({str(r["label"]) for r in rows} - {"0", "1", "True", "False"})
        if bad:
            raise LocalTaskError(f"{path}: pair labels must be 0 or 1, found {bad[:5]}")
        return Dataset.from_dict(
            {
                "sentence1": [r["sentence1"] for r in rows],
                "sentence2": [r["sentence2"] for r in rows],
                "labels": [int(r["label"]) for r in rows],
            }
        )

    # -- reranking
    def _read_reranking(self, split: str) -> RetrievalSplitData:
        path = self.folder / f"{split}_reranking.jsonl"
        rows = self._capped(_read_jsonl(path, ("query", "positive", "negative")), "queries")
        docs: dict[str, str] = {}  # text -> id: a text shared by queries is one document

        def doc_id(text: str) -> str:
            return docs.setdefault(text, f"d{len(docs)}")

        qids, qtexts, rels, ranked = [], [], {}, {}
        for i, r in enumerate(rows):
            if not isinstance(r["positive"], list) or not isinstance(r["negative"], list):
                raise LocalTaskError(f"{path}: row {i + 1}: positive and negative must be lists")
            if not r["positive"]:
                continue  # nothing to find: mteb's reranking sets drop such queries too
            qid = f"q{i}"
            qids.append(qid)
            qtexts.append(r["query"])
            rels[qid] = {doc_id(t): 1 for t in r["positive"]}
            ranked[qid] = [doc_id(t) for t in [*r["positive"], *r["negative"]]]
        if not qids:
            raise LocalTaskError(f"{path}: no query has a positive")
        corpus = Dataset.from_dict(
            {"id": list(docs.values()), "title": [""] * len(docs), "text": list(docs)}
        )
        queries = Dataset.from_dict({"id": qids, "text": qtexts})
        return RetrievalSplitData(
            corpus=corpus, queries=queries, relevant_docs=rels, top_ranked=ranked
        )

    # -- classification
    def _read_classification(self, splits: Iterable[str]) -> dict[str, Dataset]:
        data = {s: _read_jsonl(self.folder / f"{s}.jsonl", ("text", "label")) for s in splits}
        train = getattr(self, "train_split", "train")
        for s in data:
            if s != train:
                data[s] = self._capped(data[s], "test texts")
        if self.max_examples is not None and train in data:
            data[train] = self._training_pool(data[train])
        labels = [r["label"] for rows in data.values() for r in rows]
        if any(isinstance(label, str) for label in labels):
            # mteb's Hub sets carry integer labels: number ours the same way (categories.json order)
            names_file = self.folder / "categories.json"
            names = (
                textfiles.json_value(textfiles.read_text(names_file), str(names_file))
                if names_file.is_file()
                else sorted(set(map(str, labels)))
            )
            ids = {name: i for i, name in enumerate(names)}
            unknown = sorted(set(map(str, labels)) - ids.keys())
            if unknown:
                raise LocalTaskError(f"{names_file}: labels missing from the list: {unknown[:5]}")
            for rows in data.values():
                for r in rows:
                    r["label"] = ids[str(r["label"])]
        return {
            s: Dataset.from_dict(
                {"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}
            )
            for s, rows in data.items()
        }

    def _training_pool(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """With ``max_examples``, a seeded sample of ``samples_per_label`` training texts per label:
        what one of mteb's undersampled experiments trains on. mteb encodes the union of its
        experiments' samples (up to ``n_experiments`` x that, 6,160 texts for Banking77), which on
        a CPU costs more than the rest of a small suite; with this pool every experiment draws the
        same texts."""
        per_label = int(getattr(self, "samples_per_label", 8))
        by_label: dict[Any, list[int]] = {}
        for i, r in enumerate(rows):
            by_label.setdefault(r["label"], []).append(i)
        rng = random.Random(SAMPLE_SEED)
        keep = sorted(
            i
            for idx in by_label.values()
            for i in (rng.sample(idx, per_label) if len(idx) > per_label else idx)
        )
        if len(keep) < len(rows):
            self.note = _join(
                self.note, f"training pool {per_label} per label ({len(keep)} of {len(rows)} texts)"
            )
        return [rows[i] for i in keep]

    # -- retrieval
    def _read_retrieval(self) -> dict[str, RetrievalSplitData]:
        corpus_rows = _read_jsonl(self.folder / "corpus.jsonl", ("_id", "text"))
        query_rows = {
            str(r["_id"]): r["text"]
            for r in _read_jsonl(self.folder / "queries.jsonl", ("_id", "text"))
        }
        qrels = {split: self._read_qrels(split) for split in self.eval_splits}
        if self.max_examples is not None:  # capped queries, then the documents they need
            qrels = {
                split: {q: rels[q] for q in self._capped(sorted(rels), "queries")}
                for split, rels in qrels.items()
            }
        for split, rels in qrels.items():
            missing = sorted(rels.keys() - query_rows.keys())
            if missing:
                raise LocalTaskError(
                    f"{self.folder}/qrels/{split}.tsv: query ids not in queries.jsonl: {missing[:5]}"
                )
        keep = self._kept_docs([str(r["_id"]) for r in corpus_rows], qrels)
        corpus = Dataset.from_dict(
            {
                "id": [str(r["_id"]) for r in corpus_rows if str(r["_id"]) in keep],
                "title": [r.get("title") or "" for r in corpus_rows if str(r["_id"]) in keep],
                "text": [r["text"] for r in corpus_rows if str(r["_id"]) in keep],
            }
        )
        out: dict[str, RetrievalSplitData] = {}
        for split, rels in qrels.items():
            qids = [q for q in query_rows if q in rels]  # as mteb's loader: only queries with qrels
            queries = Dataset.from_dict({"id": qids, "text": [query_rows[q] for q in qids]})
            out[split] = RetrievalSplitData(
                corpus=corpus, queries=queries, relevant_docs=rels, top_ranked=None
            )
        return out

    def _read_qrels(self, split: str) -> dict[str, dict[str, int]]:
        path = self.folder / "qrels" / f"{split}.tsv"
        rels: dict[str, dict[str, int]] = {}
        for r in _read_tsv(path, ("query-id", "corpus-id", "score")):
            try:
                rels.setdefault(r["query-id"], {})[r["corpus-id"]] = int(float(r["score"]))
            except ValueError:
                raise LocalTaskError(f"{path}: score {r['score']!r} is not a number") from None
        return rels

    def _kept_docs(self, ids: list[str], qrels: dict[str, dict[str, int]]) -> set[str]:
        if self.max_docs is None or self.max_docs >= len(ids):
            return set(ids)
        relevant = {d for rels in qrels.values() for docs in rels.values() for d in docs}
        others = sorted(set(ids) - relevant)
        sample = random.Random(0).sample(
            others, max(0, min(len(others), self.max_docs - len(relevant)))
        )
        keep = (relevant & set(ids)) | set(sample)
        kept = len(relevant & set(ids))
        self.note = _join(
            self.note,
            f"corpus capped to {len(keep)} of {len(ids)} documents (all {kept} relevant kept)",
        )
        log.info("%s: %s", self.metadata.name, self.note)
        return keep


def _join(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def _first_row(path: Path) -> dict[str, Any]:
    """The first JSON object of a JSONL file ({} when there is none or it is not an object)."""
    try:
        for _, row in textfiles.jsonl(path):
            return row if isinstance(row, dict) else {}
    except textfiles.TextFileError as e:
        raise LocalTaskError(str(e)) from None
    return {}


def _read_tsv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise LocalTaskError(f"{path}: file not found ({LAYOUTS})")
    try:
        numbered = [row for _, row in textfiles.tsv_rows(path)]
    except textfiles.TextFileError as e:  # not UTF-8
        raise LocalTaskError(str(e)) from None
    header = numbered[0] if numbered else []
    missing = [c for c in required if c not in header]
    if missing:
        raise LocalTaskError(f"{path}: header lacks column(s) {missing} (has {header})")
    rows = [dict(zip(header, row)) for row in numbered[1:]]
    if not rows:
        raise LocalTaskError(f"{path}: no rows")
    return rows


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise LocalTaskError(f"{path}: file not found ({LAYOUTS})")
    rows = []
    try:
        for where, row in textfiles.jsonl(path):
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise LocalTaskError(f"{where}: missing key(s) {missing}")
            rows.append(row)
    except textfiles.TextFileError as e:  # not UTF-8, broken or too deeply nested JSON
        raise LocalTaskError(str(e)) from None
    if not rows:
        raise LocalTaskError(f"{path}: no rows")
    return rows


def _fingerprint(folder: Path) -> str:
    """Hash of the folder's data files, so results on changed data are not mixed up."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in {".tsv", ".jsonl", ".json"}):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]
