"""The ``synth`` command line: build a corpus (mine, generate, merge), verify and audit its levels.

Thin by design: each command parses its options, calls one function of its module, and turns the
errors a user can fix (bad config, bad data, bad corpus) into one red line and exit code 2.
Modules are imported inside the commands so ``synth --help`` does not load torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

from synth.errors import user_errors

app = typer.Typer(
    name="synth",
    help="Build the shared training corpus (mine or generate) and audit its graded negatives.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
USAGE_ERROR = 2
ForceOpt = Annotated[
    bool,
    typer.Option(help="Replace --out when this command wrote it (synth/outputs.py: never else)."),
]


def _run(fn: Callable[[], None]) -> None:
    """Run a command; a user-fixable error becomes one red line (no traceback) and exit code 2."""
    try:
        fn()
    except user_errors() as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            err.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True)
        raise typer.Exit(USAGE_ERROR) from None


@app.command()
def mine(
    out: Annotated[Path, typer.Option("--out", "-o", help="Corpus folder to write.")],
    config: Annotated[
        Path | None, typer.Argument(help="Mining YAML (see synth/data/mine-shared.yaml).")
    ] = None,
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            "-s",
            help="Instead of CONFIG: a .jsonl, a folder, a BEIR folder or hf:NAME (repeatable).",
        ),
    ] = None,
    task_kind: Annotated[
        str, typer.Option(help="With --source: retrieval, symmetric or asymmetric.")
    ] = "retrieval",
    instruction: Annotated[
        str | None, typer.Option(help="With --source: the rows' instruction.")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Base folder for relative source paths in CONFIG.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Embedding model (default packaged:all-minilm-l6-v2).")
    ] = None,
    relative_margin: Annotated[
        float | None, typer.Option(help="Skip candidates within this margin of the positive.")
    ] = None,
    max_rows: Annotated[
        int | None, typer.Option(help="Sample at most this many pairs per source.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for sampling pairs and picking within bands.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Encoder batch size.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    force: ForceOpt = False,
) -> None:
    """Mine a graded corpus (4 negative levels by similarity rank) from (query, positive) pairs."""

    def go() -> None:
        from synth.mine import mine as run_mine
        from synth.mine_config import MineError, config_from_sources, load_config

        overrides = {
            "model": model,
            "relative_margin": relative_margin,
            "max_rows": max_rows,
            "seed": seed,
            "batch_size": batch_size,
            "data_root": str(data_root.resolve()) if data_root else None,
        }
        if (config is None) == (not source):
            raise MineError("give a mining CONFIG file or --source (one or more), not both")
        if config is not None:
            cfg = load_config(config, overrides)
        else:
            cfg = config_from_sources(
                source or [], task_kind=task_kind, instruction=instruction, **overrides
            )
        run_mine(cfg, out, progress=not quiet, force=force)

    _run(go)


@app.command()
def generate(
    config: Annotated[
        Path, typer.Argument(help="Synthesis YAML (see synth/data/local-smollm2.yaml).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Corpus folder (overrides `output`).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Synthesize a graded corpus (MGH) over an OpenAI-compatible endpoint; rerun to resume."""

    def go() -> None:
        from synth.assemble import summary_lines
        from synth.generate import generate as run_generate
        from synth.synth_config import load_synth_config

        try:
            result = run_generate(load_synth_config(config, output=out), progress=not quiet)
        except KeyboardInterrupt:
            err.print(
                "interrupted: every finished answer is journaled; run the same command to resume"
            )
            raise typer.Exit(130) from None
        for line in summary_lines(result):
            Console().print(line, soft_wrap=True)
        if result.failed or not result.complete:
            raise typer.Exit(1)

    _run(go)


@app.command()
def merge(
    parts: Annotated[
        list[Path],
        typer.Argument(help="Corpus folders to merge (two or more).", show_default=False),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Corpus folder to write.")],
    weight: Annotated[
        list[str] | None,
        typer.Option(
            "--weight",
            "-w",
            help="PART=W: keep a seeded share W (0 < W <= 1) of that part's rows (PART: its folder name; repeatable).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the samples that weights below 1 take.")] = 0,
    name: Annotated[
        str | None, typer.Option(help="Corpus name (default: the --out folder's).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Merge corpora (e.g. synthetic MGH data + the mined retrieval mix) into one training corpus."""

    def go() -> None:
        from synth.merge import MergeError, merge_corpora, parse_weights

        if not 0 <= seed < 2**64:  # what polars' sampling takes; outside it raises OverflowError
            raise MergeError(f"--seed {seed}: expected 0 <= seed < 2**64")
        corpus = merge_corpora(
            parts, out, weights=parse_weights(weight or []), seed=seed, name=name, force=force
        )
        build = corpus.manifest["build"]
        kept = ", ".join(f"{p['name']} {p['kept']:,}/{p['rows']:,}" for p in build["parts"])
        renamed = f", {build['ids_renamed']:,} ids taken by an earlier part renamed PART:id"
        Console().print(
            f"wrote {len(corpus):,} rows to {out} ({kept}; {build['duplicates_dropped']:,} "
            f"duplicates of content dropped{renamed if build['ids_renamed'] else ''}), "
            f"sha256 {corpus.sha256[:12]}",
            highlight=False,
        )

    _run(go)


@app.command()
def verify(
    corpus: Annotated[
        Path, typer.Argument(help="Corpus folder to verify (or, with --undo, undo).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Corpus folder to write.")],
    mode: Annotated[
        Literal["reorder", "reject"],
        typer.Option(
            help="reorder: sort each row's negatives into levels by teacher score; reject: drop "
            "rows whose level order the teacher contradicts beyond --tolerance."
        ),
    ] = "reorder",
    model: Annotated[
        str,
        typer.Option(help="Teacher: a sentence-transformers model (Hub id, folder, packaged:)."),
    ] = "packaged:all-minilm-l6-v2",
    relative_margin: Annotated[
        float,
        typer.Option(help="Drop negatives scored within this share of the positive's score."),
    ] = 0.05,
    tolerance: Annotated[
        float, typer.Option(help="reject: cosine slack before an inverted pair of levels counts.")
    ] = 0.05,
    rows: Annotated[
        Literal["all", "synthetic"],
        typer.Option(help="Verify every row, or only synthetic (MGH) rows; the rest pass through."),
    ] = "all",
    batch_size: Annotated[int, typer.Option(help="Encoder batch size.")] = 64,
    undo: Annotated[
        bool, typer.Option("--undo", help="CORPUS was written by synth verify: rebuild its source.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    force: ForceOpt = False,
) -> None:
    """Check every negative with a teacher embedder: drop likely false negatives, then re-order the
    levels or reject rows whose order the teacher contradicts; counts go to the manifest."""

    def go() -> None:
        from synth.verify import REPORT_FILE, Settings, undo_verify, verify_corpus

        console = Console(highlight=False)
        if undo:
            restored = undo_verify(corpus, out, force=force)
            console.print(
                f"restored {len(restored):,} rows to {out}, sha256 {restored.sha256[:12]}"
            )
            return
        settings = Settings(
            mode=mode,
            model=model,
            relative_margin=relative_margin,
            tolerance=tolerance,
            rows=rows,
            batch_size=batch_size,
        )
        verified = verify_corpus(
            corpus,
            out,
            settings,
            progress=not quiet,
            log=lambda m: err.print(m, highlight=False),
            force=force,
        )
        counts = verified.manifest["build"]["counts"]
        rejected = ", ".join(f"{n:,} {r}" for r, n in counts["rows_rejected"].items()) or "none"
        console.print(
            f"wrote {len(verified):,} rows to {out} (kept {counts['rows_kept']:,} of "
            f"{counts['rows_verified']:,} verified; rejected: {rejected}; "
            f"re-ordered {counts['rows_reordered']:,}), sha256 {verified.sha256[:12]}; "
            f"report: {Path(out) / REPORT_FILE}"
        )

    _run(go)


@app.command()
def audit(
    corpus: Annotated[
        Path, typer.Argument(help="Corpus folder (samples.parquet + manifest.json).")
    ],
    model: Annotated[
        str, typer.Option(help="Embedding model for the audit.")
    ] = "packaged:all-minilm-l6-v2",
    max_rows: Annotated[
        int | None, typer.Option(help="Audit a seeded sample of this many rows.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Encoder batch size.")] = 64,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Check that negatives get easier from level 1 to 4; write audit.json and audit.md next to it."""

    def go() -> None:
        from synth.audit import AUDIT_JSON, AUDIT_MD, audit_corpus, print_report

        report = audit_corpus(
            corpus, model=model, max_rows=max_rows, batch_size=batch_size, progress=not quiet
        )
        console = Console()
        print_report(report, console)
        console.print(f"wrote {AUDIT_JSON} and {AUDIT_MD} in {report['path']}")

    _run(go)


if __name__ == "__main__":
    app()
