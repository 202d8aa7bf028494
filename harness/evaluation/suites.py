"""Named suites (``harness/data/suites.yaml``) and turning task entries into mteb task objects.

An entry is an mteb task name or a local folder. Names are resolved as mteb's "MTEB(eng, v1)"
benchmark configures them (English subsets, test split), so scores compare with the paper and the
classic leaderboard. Their data lives on the Hugging Face Hub: :func:`check_hub_access` fails in
seconds, with a message saying which tasks and why, when neither the Hub nor its local cache can
serve them (instead of mteb's retries, ~23 s per task).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml
from mteb.abstasks.abstask import AbsTask

from harness.config import EvalSettings
from harness.evaluation.local_tasks import LocalFolderTask, load_local_task

DATA_VAR = "NM_SHARED_DATA"
CLASSIC_BENCHMARK = "MTEB(eng, v1)"
_CHECKOUT = Path(__file__).resolve().parents[2]


class TaskResolutionError(ValueError):
    """An unknown suite or task, or tasks whose data cannot be reached; the message says which."""


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[str, ...]


@cache
def suites() -> dict[str, Suite]:
    text = resources.files("harness").joinpath("data/suites.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)["suites"]
    return {
        name: Suite(name, s["description"].strip(), tuple(s["tasks"])) for name, s in raw.items()
    }


def suite(name: str) -> Suite:
    try:
        return suites()[name]
    except KeyError:
        raise TaskResolutionError(
            f"unknown suite {name!r}; known suites: {', '.join(suites())}"
        ) from None


def task_entries(settings: EvalSettings) -> list[str]:
    """The suite's tasks then the explicit ones, without repeats, in order."""
    entries = list(suite(settings.suite).tasks) if settings.suite else []
    entries += settings.tasks
    if not entries:
        raise TaskResolutionError(
            "nothing to evaluate: give eval.suite or eval.tasks (a suite name or task names/folders)"
        )
    return list(dict.fromkeys(entries))


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where ``${NM_SHARED_DATA}`` points: the argument, the environment, or shared/data beside the checkout."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get(DATA_VAR):
        return Path(os.environ[DATA_VAR]).expanduser()
    for base in (_CHECKOUT.parent, _CHECKOUT.parent.parent):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    raise TaskResolutionError(
        f"local task folders use ${{{DATA_VAR}}}, which is not set, and no shared/data lies "
        f"beside the checkout: set {DATA_VAR}=/path/to/shared/data (`harness eval` also takes "
        "--data-dir)"
    )


def is_folder_entry(entry: str) -> bool:
    return entry.startswith((".", "/", "~", "$")) or "/" in entry or os.sep in entry


def resolve_tasks(
    entries: Iterable[str],
    *,
    data: str | os.PathLike[str] | None = None,
    max_docs: int | None = None,
    max_examples: int | None = None,
) -> list[AbsTask]:
    """mteb task objects for names and folders (folders are read lazily, at evaluation); the caps
    apply to local folders only (a named task is mteb's, whole)."""
    tasks = []
    for entry in entries:
        if is_folder_entry(entry):
            path = _expand(entry, data)
            tasks.append(load_local_task(path, max_docs=max_docs, max_examples=max_examples))
        else:
            tasks.append(named_task(entry))
    names = [t.metadata.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TaskResolutionError(f"tasks named twice (a folder and an mteb task?): {repeated}")
    return tasks


def _expand(entry: str, data: str | os.PathLike[str] | None) -> Path:
    if f"${{{DATA_VAR}}}" in entry or f"${DATA_VAR}" in entry:
        entry = re.sub(rf"\$\{{?{DATA_VAR}\}}?", str(data_dir(data)).replace("\\", "/"), entry)
    return Path(os.path.expandvars(entry)).expanduser()


@cache
def _classic_tasks() -> dict[str, AbsTask]:
    import mteb

    return {t.metadata.name: t for t in mteb.get_benchmark(CLASSIC_BENCHMARK).tasks}


def named_task(name: str) -> AbsTask:
    """An mteb task by name, configured as in MTEB(eng, v1) when it is one of its tasks."""
    import mteb

    if name in _classic_tasks():
        return copy.deepcopy(_classic_tasks()[name])
    try:
        return mteb.get_task(name, languages=["eng"])
    except KeyError as e:
        hint = str(e.args[0]) if e.args else ""
        raise TaskResolutionError(
            f"unknown task {name!r}: not an mteb task name and not a folder path. {hint}".strip()
        ) from None


# ---------------------------------------------------------------- Hub access


def hub_datasets(task: AbsTask) -> list[tuple[str, str]]:
    """(repo, revision) of the Hub data a task needs; none for local folders."""
    if isinstance(task, LocalFolderTask):
        return []
    subtasks = getattr(task.metadata, "tasks", None)  # aggregate tasks (CQADupstackRetrieval)
    if subtasks:
        return [d for sub in subtasks for d in hub_datasets(sub)]
    return [(task.metadata.dataset["path"], task.metadata.dataset["revision"])]


def _in_hub_cache(repo: str, revision: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (
        Path(HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "snapshots" / revision
    ).is_dir()


def hub_reachable(timeout: float = 3.0) -> bool:
    import httpx
    from huggingface_hub.constants import ENDPOINT

    try:
        httpx.head(ENDPOINT, timeout=timeout)
    except httpx.HTTPError:
        return False
    return True


def check_hub_access(tasks: Sequence[AbsTask]) -> None:
    """Fail fast when named tasks need Hub data that is neither cached nor reachable."""
    from huggingface_hub import is_offline_mode

    missing = [
        t.metadata.name for t in tasks if not all(_in_hub_cache(*d) for d in hub_datasets(t))
    ]
    if not missing:
        return
    if is_offline_mode():
        why = "HF_HUB_OFFLINE is set and their data is not in the local Hugging Face cache"
    elif not hub_reachable():
        why = "the Hugging Face Hub cannot be reached and their data is not in the local cache"
    else:
        return
    raise TaskResolutionError(
        f"cannot evaluate {', '.join(missing)}: {why}. Use local task folders instead "
        f"(e.g. --suite local-sts, or a folder path), or run where the Hub is reachable."
    )


def check_eval(
    settings: EvalSettings, *, where: str | None = None, data: str | os.PathLike[str] | None = None
) -> list[AbsTask]:
    """Resolve the evaluation's tasks now, before anything trains: an unknown suite or task name, a
    missing or malformed local folder, or Hub data that cannot be reached is an error here, not
    after hours of training. Returns the tasks (local folders are checked, not read); none when no
    suite or task is configured (the trial reports that itself)."""
    if not settings.suite and not settings.tasks:
        return []
    try:
        tasks = resolve_tasks(
            task_entries(settings),
            data=data,
            max_docs=settings.max_docs,
            max_examples=settings.max_examples,
        )
        check_hub_access(tasks)
    except (TaskResolutionError, ValueError) as e:  # LocalTaskError is a ValueError
        prefix = f"{where}: eval: " if where else "eval: "
        raise TaskResolutionError(prefix + str(e)) from None
    return tasks
