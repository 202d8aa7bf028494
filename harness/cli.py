"""The ``harness`` command line: thin wrappers over the library functions.

harness sweep EXPERIMENT.yaml      run the grid as Ray Tune trials, tracked in MLflow
harness ui EXPERIMENT.yaml         the MLflow UI on 127.0.0.1
harness tables EXPERIMENT.yaml     ablation tables and plots from MLflow into results/<name>/
harness train EXPERIMENT.yaml      one configuration (the base settings or one grid cell), no Ray
harness mntp EXPERIMENT.yaml       the file's MNTP adapter (LLM2Vec's bidirectional adaptation)
harness eval MODEL_OR_RUN          mteb evaluation of a saved model or an MLflow run's model
harness export MODEL_OR_RUN --out DIR   a trained model as a sentence-transformers folder
harness audit CORPUS MODEL_OR_RUN  per-level similarity of a corpus's negatives, scored by a model
harness check EXPERIMENT.yaml      validate a file and print the resolved trials

Longer than the other modules (about 490 lines) on purpose: it is the one place where the commands,
their options and their help text are declared, each command a few lines that parse and delegate.
Splitting it by command would spread one screen of ``--help`` over several files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from harness.config import Attention, Pooling

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Ablation harness for LLM text embeddings (Negative Matters): train, sweep, evaluate, tabulate.",
)
console = Console(stderr=True)

ExperimentArg = Annotated[Path, typer.Argument(help="Experiment YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="FIELD=VALUE",
        help="Override a field: --set train.lr=1e-4 (repeatable).",
        show_default=False,
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show library logs.")]
ModelOrRunArg = Annotated[
    str,
    typer.Argument(
        help="A folder saved by `harness train`, an MLflow run id, or a base model (Hub id, folder, packaged:...)."
    ),
]
# How an untrained base model embeds (a saved model or run carries its own settings)
PoolingOpt = Annotated[Pooling, typer.Option(help="Pooling for an untrained base model.")]
AttentionOpt = Annotated[Attention | None, typer.Option(help="For a base model.")]
TemplateOpt = Annotated[
    str | None,
    typer.Option(metavar="e5|llm2vec|TEMPLATE", help="For a base model: a template with {text}."),
]
InitAdapterOpt = Annotated[
    str | None,
    typer.Option(help="For a base model: a PEFT adapter merged first (e.g. from harness mntp)."),
]
TrackingUriOpt = Annotated[str | None, typer.Option(help="MLflow store of the run (for a run id).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")]


def _quiet(verbose: bool) -> None:
    from harness.logs import quiet_logs

    quiet_logs(verbose)


def _fail(message: str, code: int = 2) -> None:
    # soft_wrap: a long path stays on one line (copyable), however narrow the terminal
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _known_errors() -> tuple[type[BaseException], ...]:
    from harness.config import ConfigError
    from harness.evaluation.suites import TaskResolutionError
    from harness.models import ModelLoadError
    from harness.tracking import TrackingError
    from synth.corpus import CorpusError
    from synth.locks import LockedError
    from synth.outputs import OutputError
    from synth.packaged import PackagedModelError

    return (
        ConfigError,
        CorpusError,
        OutputError,
        ModelLoadError,
        PackagedModelError,
        TrackingError,
        FileNotFoundError,
        LockedError,
        TaskResolutionError,
    )


@app.command()
def sweep(
    experiment: ExperimentArg,
    set_: SetOpt = None,
    address: Annotated[
        str | None,
        typer.Option(help="Join a Ray cluster (HOST:PORT); default: a local Ray instance."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Skip trials that already FINISHED in MLflow (same trial_key).")
    ] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Run the experiment's grid (or search) as Ray Tune trials, tracked in MLflow."""
    _quiet(verbose)
    from harness.cluster import ClusterError
    from harness.sweep import SweepError, run_sweep

    try:
        summary = run_sweep(experiment, set_ or [], address=address, resume=resume)
    except (*_known_errors(), SweepError, ClusterError) as e:
        _fail(str(e))
    raise typer.Exit(summary.exit_code)


@app.command()
def train(
    experiment: ExperimentArg,
    cell: Annotated[
        list[str] | None,
        typer.Option(
            metavar="AXIS=VALUE,...",
            help="Pick one grid cell: --cell strategy=curriculum,pooling=ata (default: the file's base settings).",
        ),
    ] = None,
    set_: SetOpt = None,
    output: Annotated[
        Path | None, typer.Option(help="Output folder (default results/runs/<name>/<cell>).")
    ] = None,
    track: Annotated[bool, typer.Option(help="Log a run to MLflow.")] = True,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Run the eval suite after training.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train one configuration without Ray: progress bar, held-out score, MLflow run, saved model."""
    _quiet(verbose)
    from harness.single import train_single

    try:
        result = train_single(
            experiment,
            set_ or [],
            cell or [],
            output=output,
            track=track,
            evaluate=evaluate,
            console=console,
        )
    except _known_errors() as e:
        _fail(str(e))
    console.print(
        f"saved model: [bold]{result.model_dir}[/]  (reload with harness.embedder.Embedder.load)"
    )


@app.command()
def mntp(
    experiment: ExperimentArg,
    set_: SetOpt = None,
    track: Annotated[bool, typer.Option(help="Log a run to MLflow.")] = True,
    force: Annotated[
        bool, typer.Option(help="Train again even when the adapter exists with the same settings.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train the file's MNTP adapter (mntp: block); trials use it through model.init_adapter."""
    _quiet(verbose)
    from harness.corpora import load_corpus
    from harness.experiment_file import load_experiment
    from harness.mntp import MntpError, corpus_texts, run_mntp

    try:
        exp = load_experiment(experiment, set_ or [])
        run_mntp(
            exp,
            lambda: corpus_texts(load_corpus(exp, console).frame),
            track=track,
            force=force,
            say=console.print,
        )
    except (*_known_errors(), MntpError) as e:
        _fail(str(e))


@app.command()
def tables(
    experiment: Annotated[
        Path | None,
        typer.Argument(
            help="Experiment YAML (grid order, rows, baseline, store).", show_default=False
        ),
    ] = None,
    experiment_name: Annotated[
        str | None,
        typer.Option("--experiment", help="MLflow experiment name, when no file is at hand."),
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (overrides the file's).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output folder (default results/<name>).")
    ] = None,
    log: Annotated[
        bool, typer.Option(help="Also log the tables and plots to the latest sweep run.")
    ] = True,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Regenerate the ablation tables (Markdown, CSV, LaTeX), plots and long export from MLflow."""
    _quiet(verbose)
    from harness.experiment_file import load_experiment
    from harness.tables import TablesError, write_tables
    from synth.corpus import check_output_folder

    if experiment is None and experiment_name is None:
        _fail("give an experiment file or --experiment NAME")
    try:
        if output is not None:  # before the store is read
            check_output_folder(output, "--output", "the tables are written into a folder")
        exp = load_experiment(experiment, set_ or []) if experiment else None
        if exp is not None:
            from harness.init_adapter import pin_if_present

            pin_if_present(exp)  # the trial keys of the current configuration include its hash
        result = write_tables(
            exp,
            experiment_name=experiment_name,
            tracking_uri=tracking_uri,
            output_dir=output,
            log_to_mlflow=log,
        )
    except (*_known_errors(), TablesError) as e:
        _fail(str(e))
    for f in result.files:
        typer.echo(str(f))


@app.command()
def plan(
    experiment: ExperimentArg,
    power: Annotated[float, typer.Option(help="Wanted power of each comparison.")] = 0.8,
    alpha: Annotated[
        float, typer.Option(help="Family-wise error rate of the table (Holm).")
    ] = 0.05,
    effect: Annotated[
        float | None,
        typer.Option(
            help="Difference to detect in table points (x100 scores, e.g. 1.0); "
            "default: each comparison's observed difference."
        ),
    ] = None,
    concurrent: Annotated[
        int | None,
        typer.Option(
            min=1, help="Trials run at once (default resources.max_concurrent_trials, else 1)."
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (overrides the file's).")
    ] = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Seeds each comparison of the table needs for a given power, and their cost, from the
    trials already in the store (which is only read)."""
    _quiet(verbose)
    from harness.experiment_file import load_experiment
    from harness.init_adapter import pin_if_present
    from harness.tables import TablesError
    from harness.tables.plan import PlanError, make_plan, render

    if not 0 < power < 1 or not 0 < alpha < 1:
        _fail(f"--power and --alpha must lie strictly between 0 and 1 (got {power}, {alpha})")
    try:
        exp = load_experiment(experiment, set_ or [])
        pin_if_present(exp)
        made = make_plan(
            exp,
            tracking_uri=tracking_uri,
            alpha=alpha,
            power=power,
            effect=None if effect is None else effect / 100,
            concurrent=concurrent,
        )
    except (*_known_errors(), TablesError, PlanError) as e:
        _fail(str(e))
    typer.echo(render(made), nl=False)


@app.command()
def ui(
    target: Annotated[
        str, typer.Argument(help="Experiment YAML file or an MLflow tracking URI.")
    ] = "sqlite:///results/mlflow.db",
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[
        str, typer.Option(help="Bind address (loopback unless you mean it).")
    ] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the UI to answer.")] = 180.0,
    verbose: VerboseOpt = False,
) -> None:
    """Start the MLflow UI for the experiment's store and print its URL (Ctrl-C stops it)."""
    _quiet(verbose)
    from harness.ui import UIError, serve_ui

    try:
        serve_ui(target, port=port, host=host, timeout=timeout)
    except (*_known_errors(), UIError) as e:
        _fail(str(e))


def _base_settings(
    pooling: str, attention: str | None, template: str | None, init_adapter: str | None
) -> dict[str, str | None]:
    """Check the base-model options (before anything loads) and return them as model.* fields
    (typer has checked --pooling and --attention against their choices)."""
    if template is not None and template not in ("e5", "llm2vec") and "{text}" not in template:
        _fail(f"--template {template!r}: expected e5, llm2vec or a template with {{text}}")
    return {"attention": attention, "template": template, "init_adapter": init_adapter}


@app.command("eval")
def eval_(
    model_or_run: ModelOrRunArg,
    suite: Annotated[
        str | None,
        typer.Option(help="Named suite (harness/data/suites.yaml), e.g. local-sts, mteb-en."),
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks", metavar="TASK", help="mteb task name or local folder (repeatable)."
        ),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            help="Where ${NM_SHARED_DATA} points (default: $NM_SHARED_DATA or shared/data beside the checkout)."
        ),
    ] = None,
    output_dir: Annotated[
        str, typer.Option(help="Folder for results and mteb's files.")
    ] = "results/eval",
    pooling: PoolingOpt = "mean",
    attention: AttentionOpt = None,
    template: TemplateOpt = None,
    init_adapter: InitAdapterOpt = None,
    batch_size: Annotated[int, typer.Option(help="Encoding batch size.")] = 32,
    max_docs: Annotated[
        int | None, typer.Option(help="Cap local retrieval corpora (relevant docs always kept).")
    ] = None,
    max_examples: Annotated[
        int | None,
        typer.Option(help="Cap each local task's evaluated pairs, texts or queries (seeded)."),
    ] = None,
    no_instructions: Annotated[
        bool, typer.Option("--no-instructions", help="Embed every text without an instruction.")
    ] = False,
    tracking_uri: TrackingUriOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Recompute results mteb has cached.")] = False,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Evaluate a model with mteb: per-task main scores, category means and the average."""
    _quiet(verbose)
    from harness.evaluation.command import ModelNotFoundError, eval_command

    base = _base_settings(pooling, attention, template, init_adapter)
    if not suite and not tasks:
        _fail("give --suite NAME or at least one --tasks")
    try:
        eval_command(
            model_or_run,
            suite,
            tasks or [],
            data_dir=data_dir,
            output_dir=output_dir,
            pooling=pooling,  # type: ignore[arg-type]
            batch_size=batch_size,
            max_docs=max_docs,
            max_examples=max_examples,
            no_instructions=no_instructions,
            tracking_uri=tracking_uri,
            overwrite=overwrite,
            device=device,
            base_settings=base,
        )
    except (*_known_errors(), ModelNotFoundError, ValueError) as e:
        _fail(str(e))


@app.command()
def export(
    model_or_run: Annotated[
        str,
        typer.Argument(
            help="A folder saved by `harness train` or an MLflow run id.", show_default=False
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The folder to write.", show_default=False)],
    merge: Annotated[
        bool, typer.Option(help="Merge the LoRA adapter into the weights (no peft needed).")
    ] = False,
    instruction: Annotated[
        str | None, typer.Option(help="The instruction of the `query` prompt.")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(metavar="float32|bfloat16|float16", help="The weights' dtype."),
    ] = None,
    log: Annotated[
        bool, typer.Option(help="Also log it to the run as an MLflow model (a run id only).")
    ] = False,
    register: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Also register that MLflow model under NAME."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace --out when it is an export (never another folder).")
    ] = False,
    tracking_uri: TrackingUriOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Write a trained model as a sentence-transformers folder: one call loads it,
    SentenceTransformer(DIR, trust_remote_code=True), and it embeds as the harness does."""
    _quiet(verbose)
    from harness.export import ExportError, export_model
    from harness.saved_models import ModelNotFoundError
    from synth.corpus import check_output_folder

    try:
        check_output_folder(out, "--out", "the model is exported as a folder")
        result = export_model(
            model_or_run,
            out,
            merge=merge,
            instruction=instruction,
            dtype=dtype,
            device=device,
            tracking_uri=tracking_uri,
            force=force,
            log=log,
            register=register,
        )
    except (*_known_errors(), ModelNotFoundError, ExportError) as e:
        _fail(str(e))
    how = "LoRA merged" if result.merged else "LoRA adapter in adapter/, needs peft"
    console.print(
        f"exported to {result.folder} ({how}); load it with "
        f"SentenceTransformer({str(result.folder)!r}, trust_remote_code=True)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if result.model_id:
        console.print(f"MLflow model: models:/{result.model_id}", highlight=False)
    if result.version:
        console.print(f"registered: models:/{register}/{result.version}", highlight=False)


@app.command()
def audit(
    corpus: Annotated[
        Path,
        typer.Argument(help="Corpus folder (samples.parquet + manifest.json).", show_default=False),
    ],
    model_or_run: ModelOrRunArg,
    output: Annotated[
        Path, typer.Option("--out", help="Folder for audit.json and audit.md.")
    ] = Path("results/audit"),
    max_rows: Annotated[
        int | None, typer.Option(help="Audit a seeded sample of this many rows.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Encoding batch size.")] = 32,
    pooling: PoolingOpt = "mean",
    attention: AttentionOpt = None,
    template: TemplateOpt = None,
    init_adapter: InitAdapterOpt = None,
    tracking_uri: TrackingUriOpt = None,
    device: DeviceOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Are the corpus's hard negatives closer to the query and positive than its easy ones, as a
    (trained) model sees them? Queries and documents are embedded as in training; per level: mean
    cosine to query and positive, share scored above the positive, Spearman over levels."""
    _quiet(verbose)
    from harness.evaluation.command import ModelNotFoundError, load_embedder
    from harness.heldout import level_audit
    from synth.audit import print_report, write_report
    from synth.corpus import check_output_folder, read_corpus

    base = _base_settings(pooling, attention, template, init_adapter)
    try:
        check_output_folder(output, "--out", "audit.json and audit.md are written into a folder")
        data = read_corpus(corpus)
        embedder, _ = load_embedder(
            model_or_run,
            pooling=pooling,
            base_settings=base,
            tracking_uri=tracking_uri,
            device=device,
            exports=False,
        )  # type: ignore[arg-type]
        report = level_audit(
            embedder, data, model=model_or_run, max_rows=max_rows, batch_size=batch_size
        )
    except (*_known_errors(), ModelNotFoundError) as e:
        _fail(str(e))
    out = Console()
    print_report(report, out)
    json_file, md_file = write_report(report, output)
    out.print(f"wrote {json_file} and {md_file}", highlight=False)


@app.command()
def decontaminate(
    experiment: ExperimentArg,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder of the checked copy (default: the corpus folder + '-clean')."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace --out when it is a copy this command wrote (never else).")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Write a copy of the file's corpus without the rows that hold a text of its evaluation tasks
    (normalised exact match), counting them by task in the copy's manifest."""
    from harness.decontamination import COMMAND, decontaminate_corpus
    from harness.experiment_file import load_experiment
    from synth import outputs
    from synth.corpus import read_corpus
    from synth.decontaminate import RECORD

    try:
        exp = load_experiment(experiment, set_ or [])
        source_dir = exp.resolve_path(exp.corpus.path)
        target = (out or source_dir.with_name(source_dir.name + "-clean")).resolve()
        outputs.check_output(target, COMMAND, inputs=[source_dir], force=force)
        source = read_corpus(source_dir)
        with outputs.replacing(target, COMMAND, inputs=[source_dir], force=force) as staging:
            written, found = decontaminate_corpus(exp, source, staging)
    except _known_errors() as e:
        _fail(str(e))
    entry = written.manifest[RECORD]
    for task, n in entry["dropped"].items():
        typer.echo(f"  {task}: {n} row(s)")
    if found.unreadable:
        typer.echo(f"  not checked (data not readable here): {', '.join(found.unreadable)}")
    typer.echo(
        f"{target}: {len(written)} rows ({entry['rows_dropped']} of {entry['rows_before']} "
        f"dropped); point corpus.path at it"
    )


@app.command()
def check(experiment: ExperimentArg, set_: SetOpt = None) -> None:
    """Check an experiment file (nothing is loaded, built or run): its grid, model, init adapter,
    evaluation tasks and corpus, every problem on its own line; then list its trials."""
    from harness.experiment_file import cell_label, load_experiment
    from harness.preflight import preflight

    try:
        exp = load_experiment(experiment, set_ or [])
    except _known_errors() as e:
        _fail(str(e))
    checked = preflight(exp)
    for finding in checked.findings:
        tag = "[red]error[/]" if finding.fatal else "[yellow]warning[/]"
        console.print(
            f"{tag} ({finding.part}) {escape(finding.message)}", highlight=False, soft_wrap=True
        )
    if checked.errors:
        n = len(checked.errors)
        _fail(f"{experiment}: not valid ({n} problem{'s' if n > 1 else ''} above)")
    typer.echo(f"{experiment}: valid; experiment {exp.name!r}, {len(checked.cells)} trial(s)")
    tasks = checked.tasks
    if tasks:
        typer.echo(
            f"  evaluation: {len(tasks)} task(s): "
            f"{', '.join(t.metadata.name for t in tasks[:8])}{' ...' if len(tasks) > 8 else ''}"
        )
    for c in checked.cells:
        typer.echo(f"  {cell_label(c)}")


def main() -> None:  # pragma: no cover - console entry point alias
    app(prog_name="harness")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
