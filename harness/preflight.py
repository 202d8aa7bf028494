"""What `harness check` checks before anything loads: every part of an experiment file that a
sweep would otherwise fail on seconds or hours later, each reported as one finding.

A sweep stops at its first problem; `check` collects them all (a grid typo does not hide a
missing corpus), so one run of it lists what to fix. Nothing here loads a model, reads a corpus's
rows or builds anything: a packaged model is found by its package, a Hub id by the local Hugging
Face cache or, online, by the Hub answering; the corpus by its manifest or its ``corpus.build``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import ConfigError, Experiment, is_local_path

if TYPE_CHECKING:
    from mteb.abstasks import AbsTask


@dataclass(frozen=True)
class Finding:
    """One problem of an experiment file: what part, and one line saying what is wrong where."""

    part: str  # "grid", "model", "init adapter", "evaluation", "corpus"
    message: str
    fatal: bool = True  # False: a warning (the sweep would run)


@dataclass
class Checked:
    """The result of :func:`preflight`: the trials and tasks it found, and every finding."""

    cells: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[AbsTask] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.fatal]


def preflight(exp: Experiment, *, evaluate: bool = True) -> Checked:
    """Check ``exp`` without loading anything heavy; see the module docstring.

    Args:
        exp: the loaded experiment (``load_experiment``; its ``source`` names it in messages).
        evaluate: also resolve the evaluation's tasks (``eval.enabled`` decides too).
    """
    from harness.experiment_file import validated_cells
    from harness.init_adapter import check_init_adapter

    out = Checked()

    def attempt(part: str, check: Callable[[], Any]) -> Any:
        try:
            return check()
        except (ConfigError, FileNotFoundError, ValueError) as e:  # the checks' one-line errors
            out.findings.append(Finding(part, str(e)))
            return None

    out.cells = attempt("grid", lambda: validated_cells(exp)) or []
    problem = model_problem(exp.model.name, "model.name")
    if problem:
        out.findings.append(Finding("model", f"{exp.source}: {problem}"))
    adapter = exp.model.init_adapter
    if adapter and not is_local_path(adapter) and not exp.resolve_path(adapter).exists():
        problem = model_problem(adapter, "model.init_adapter", file="adapter_config.json")
        if problem:
            out.findings.append(Finding("init adapter", f"{exp.source}: {problem}"))
    attempt("init adapter", lambda: check_init_adapter(exp))
    if evaluate and exp.eval.enabled:
        from harness.evaluation.suites import check_eval

        out.tasks = attempt("evaluation", lambda: check_eval(exp.eval, where=exp.source)) or []
    out.findings += corpus_findings(exp, out.tasks)
    return out


def model_problem(name: str, what: str, *, file: str = "config.json") -> str | None:
    """Why ``name`` (a packaged model, a local folder or a Hub id) would not load here, or None."""
    from synth.packaged import PackagedModelError, is_packaged, locate

    if is_packaged(name):
        try:
            locate(name)
        except PackagedModelError as e:
            return f"{what} {name}: {e}"
        return None
    if is_local_path(name):
        folder = Path(name).expanduser()
        return None if folder.is_dir() else f"{what} {name}: no such folder"
    return _hub_problem(name, what, file)


def _hub_problem(repo: str, what: str, file: str) -> str | None:
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, file)
    if isinstance(cached, str):
        return None
    if is_offline_mode():
        return (
            f"{what} {repo}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
            "(download it where the Hub is reachable, or give a local folder)"
        )
    from harness.evaluation.suites import hub_reachable

    if not hub_reachable():
        return f"{what} {repo}: not in the local Hugging Face cache and the Hub cannot be reached"
    return None


def corpus_findings(exp: Experiment, tasks: list[AbsTask]) -> list[Finding]:
    """The corpus: there (its manifest readable), or made by the file's ``corpus.build``; a
    corpus never checked against the file's tasks is a warning (``harness decontaminate``)."""
    from harness.corpora import unchecked_warning
    from synth.corpus import CorpusError, read_manifest

    path = exp.resolve_path(exp.corpus.path)
    build = exp.corpus.build
    if not (path / "manifest.json").is_file():
        if path.exists() and any(path.iterdir()):
            return [Finding("corpus", f"corpus.path {path}: not a corpus (no manifest.json)")]
        if build is None:
            return [
                Finding(
                    "corpus",
                    f"{exp.source}: corpus.path {path} does not exist and there is no "
                    "corpus.build saying how to make it (build it with `synth mine` / "
                    "`synth generate`)",
                )
            ]
        config = exp.resolve_path(build.config)
        if not config.is_file():
            return [Finding("corpus", f"{exp.source}: corpus.build.config {config}: no such file")]
        return []
    try:
        manifest = read_manifest(path)
    except CorpusError as e:
        return [Finding("corpus", str(e))]
    warning = unchecked_warning(exp, manifest) if tasks else None
    return [Finding("corpus", warning, fatal=False)] if warning else []
