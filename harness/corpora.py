"""The corpus stage, on the driver: find the experiment's corpus, build it when the file says how
(``corpus.build``: ``synth mine`` / ``synth generate`` in-process, resuming an unfinished synthesis),
read and hash-check it once, and check that it fits the trials before any of them starts."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from harness.config import ConfigError, Experiment
from synth.corpus import MANIFEST_FILE, SYNTHETIC_SOURCE, Corpus, CorpusError, read_corpus
from synth.errors import user_errors


def load_corpus(exp: Experiment, console: Console) -> Corpus:
    """Read and hash-check the corpus once; build it first when the file says how and it is
    missing, or resume a synthesis that did not finish."""
    path = exp.resolve_path(exp.corpus.path)
    build = exp.corpus.build
    resume = build is not None and build.kind == "generate" and _incomplete_synthesis(path)
    if resume or not path.exists():
        if build is None:
            raise ConfigError(
                f"{exp.source}: corpus.path {path} does not exist and there is no corpus.build "
                "saying how to make it (build it with `synth mine` / `synth generate`)"
            )
        config = exp.resolve_path(build.config)
        what = "resuming the corpus build" if resume else "building the corpus"
        console.print(f"[bold]{what}[/] ({build.kind}, {config}) -> {path}")
        _build_corpus(build.kind, config, path, exp)
        if exp.corpus.decontaminate:
            _decontaminate_built(exp, path, console)
    corpus = read_corpus(path)
    console.print(f"corpus {corpus.name}: {len(corpus)} rows, sha256 {corpus.sha256[:12]}")
    warn_unchecked(exp, corpus.manifest, console)
    return corpus


def _decontaminate_built(exp: Experiment, path: Path, console: Console) -> None:
    from harness.decontamination import decontaminate_built

    corpus = decontaminate_built(exp, path)
    entry = corpus.manifest["decontamination"]
    costs = ", ".join(f"{task} {n}" for task, n in entry["dropped"].items() if n) or "none"
    console.print(
        f"decontaminated against {len(entry['tasks'])} evaluation task(s): "
        f"{entry['rows_dropped']} of {entry['rows_before']} rows dropped (by task: {costs})"
    )


def unchecked_warning(exp: Experiment, manifest: dict) -> str | None:
    """The warning that the corpus was never checked against some of the file's evaluation tasks
    (plain text), or None."""
    from harness.decontamination import unchecked

    missing = unchecked(exp, manifest)
    if not missing:
        return None
    shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    return (
        f"corpus {exp.resolve_path(exp.corpus.path)} was not checked against evaluation "
        f"task(s) {shown}: texts shared with them would inflate their scores "
        f"(`harness decontaminate {exp.source or 'FILE'}` writes a checked copy)"
    )


def warn_unchecked(exp: Experiment, manifest: dict, console: Console) -> None:
    """Say which of the file's evaluation tasks the corpus was never checked against."""
    warning = unchecked_warning(exp, manifest)
    if warning:
        console.print("[yellow]warning[/] " + escape(warning), soft_wrap=True)


def check_corpus_fits(exp: Experiment, corpus: Corpus) -> None:
    """Fail before any trial starts when the corpus is too small for a trial's held-out slice and
    batch (the trial itself would only find out after Ray started it)."""
    t, rows = exp.train, len(corpus)
    if t.schedule_rows == "synthetic" and not corpus.frame["source"].eq(SYNTHETIC_SOURCE).any():
        raise ConfigError(
            f"{exp.source}: train.schedule_rows is 'synthetic' but corpus "
            f"{corpus.path or corpus.name} has no rows whose source is {SYNTHETIC_SOURCE!r}, so no row "
            "would follow the strategy; set train.schedule_rows: all"
        )
    train_rows = rows - t.heldout_size if t.heldout_size > 0 else rows
    if train_rows < max(t.batch_size, 1) or (t.heldout_size > 0 and t.heldout_size >= rows):
        raise ConfigError(
            f"{exp.source}: train.heldout_size={t.heldout_size} and "
            f"train.batch_size={t.batch_size} need more rows than corpus "
            f"{corpus.path or corpus.name} has ({rows}); lower them or use a bigger corpus"
        )


def _incomplete_synthesis(path: Path) -> bool:
    """A corpus ``synth generate`` wrote but did not finish (budget, failed requests, a kill)."""
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return (path / "work").is_dir()  # killed before it wrote a manifest: its journal is there
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("complete") is False
    except (OSError, ValueError):
        return False  # read_corpus names the problem


def _build_corpus(kind: str, config: Path, output: Path, exp: Experiment) -> None:
    """Run ``synth mine`` / ``synth generate`` in-process, once, on the driver; an unfinished
    synthesis stops the sweep (rerun it to resume: every finished answer is journaled)."""
    try:
        if kind == "mine":
            from synth.mine import mine
            from synth.mine_config import load_config

            mine(load_config(config), output)
        else:
            from synth.generate import generate
            from synth.synth_config import load_synth_config

            result = generate(load_synth_config(config, output=output))
            if not result.complete:
                manifest = result.corpus.manifest
                why = manifest["stopped"] or f"last error: {manifest['requests']['last_error']}"
                raise CorpusError(
                    f"{exp.source}: corpus.build: the synthesis into {output} is incomplete "
                    f"({why}); run the sweep again to resume it (finished answers are kept)"
                )
    except user_errors() as e:
        if isinstance(e, CorpusError):
            raise
        raise CorpusError(f"{exp.source}: corpus.build ({kind}, {config}): {e}") from None
    except ImportError as e:
        raise ConfigError(
            f"{exp.source}: corpus.build kind {kind!r} needs {e.name}, which this installation "
            f"lacks; build the corpus first (`synth {kind} {config}`) into {output}"
        ) from None
