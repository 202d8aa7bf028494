"""The experiment's evaluation texts, and its corpus checked against them (``synth/decontaminate.py``
does the matching).

- A corpus the sweep builds (``corpus.build``) loses its contaminated rows before anyone trains on
  it (``corpus.decontaminate``, on by default); the manifest records, per task, the data revision
  checked and the rows dropped.
- A corpus that exists is not rewritten behind the user's back: ``harness check`` and the sweep say
  which of the file's evaluation tasks it was never checked against, and ``harness decontaminate``
  writes a checked copy.

Only local task folders can be read offline; a named mteb task whose data this machine cannot load
is reported as unchecked, never silently passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import Experiment
from synth.corpus import Corpus, read_corpus
from synth.decontaminate import checked_tasks, decontaminate, normalized_set

COMMAND = "harness decontaminate"  # what synth.outputs.MARKER records in a checked copy


@dataclass(frozen=True)
class EvalTexts:
    texts: dict[str, frozenset[str]]  # task -> its normalised evaluation texts
    revisions: dict[str, str]  # task -> the data revision they were read from
    unreadable: list[str]  # tasks whose texts cannot be read here (Hub tasks offline)


def eval_tasks(exp: Experiment) -> list[Any]:
    """The file's evaluation tasks, uncapped (decontamination checks every text, not the sample)."""
    if not exp.eval.enabled or not (exp.eval.suite or exp.eval.tasks):
        return []
    from harness.evaluation.suites import resolve_tasks, task_entries

    return resolve_tasks(task_entries(exp.eval))


def eval_texts(exp: Experiment) -> EvalTexts:
    """Every text of the evaluated splits of the file's local evaluation tasks."""
    from harness.evaluation.local_tasks import LocalFolderTask

    texts, revisions, unreadable = {}, {}, []
    for task in eval_tasks(exp):
        name = task.metadata.name
        if not isinstance(task, LocalFolderTask):
            unreadable.append(name)
            continue
        task.load_data()
        texts[name] = normalized_set(list(_task_texts(task)))
        revisions[name] = str(task.metadata.dataset["revision"])
    return EvalTexts(texts, revisions, unreadable)


def _task_texts(task: Any) -> list[str]:
    kind, splits, data = task.metadata.type, task.eval_splits, task.dataset
    out: list[str] = []
    if kind in ("Retrieval", "Reranking"):
        for split in splits:
            part = data["default"][split]
            out += list(part["queries"]["text"])
            out += list(part["corpus"]["text"])
            out += [t for t in part["corpus"]["title"] if t]
    elif kind in ("STS", "PairClassification"):
        for split in splits:
            out += list(data[split]["sentence1"]) + list(data[split]["sentence2"])
    else:  # classification: the test texts (training on a task's train split is its purpose)
        for split in splits:
            out += list(data[split]["text"])
    return out


def unchecked(exp: Experiment, manifest: dict[str, Any]) -> list[str]:
    """The file's evaluation tasks the corpus was not decontaminated against (by name and data
    revision: a task whose local data changed since counts as unchecked)."""
    from harness.evaluation.local_tasks import LocalFolderTask

    done = checked_tasks(manifest)
    missing = []
    for task in eval_tasks(exp):
        name = task.metadata.name
        revision = (
            str(task.metadata.dataset["revision"]) if isinstance(task, LocalFolderTask) else None
        )
        if revision is None or done.get(name) != revision:
            missing.append(name)
    return missing


def decontaminate_corpus(exp: Experiment, source: Corpus, out: Path) -> tuple[Corpus, EvalTexts]:
    """``source`` without the rows that hold a text of the file's local evaluation tasks, written
    to ``out`` (the caller makes sure ``out`` is its to write)."""
    found = eval_texts(exp)
    written, _ = decontaminate(source, found.texts, found.revisions, out)
    return written, found


def decontaminate_built(exp: Experiment, path: Path) -> Corpus:
    """Decontaminate the corpus the sweep has just built at ``path`` in place (it is ours)."""
    corpus, _ = decontaminate_corpus(exp, read_corpus(path), path)
    return corpus
