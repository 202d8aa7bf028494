"""The ablation table as Markdown, CSV and LaTeX (booktabs), with the same footnotes in each.

Markdown and LaTeX print scores x100 with two decimals, as the paper does; the CSV keeps MLflow's
raw values at full precision for anyone who wants to recompute. Nothing here reads a clock or the
environment, so the same runs always give the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable

from harness.tables.ablation import (
    AVG,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    HELDOUT,
    AblationTable,
    Row,
    axis_title,
)
from harness.tables.collect import CellRuns
from harness.tracking import redact_text

SCALE = 100.0
DAGGER = "†"


def fmt(value: float) -> str:
    return f"{SCALE * value:.2f}"


def fmt_delta(value: float) -> str:
    return f"{SCALE * value:+.2f}"


def _best(table: AblationTable) -> dict[str, str]:
    """Per column, the best mean as printed (ties are all bold); none when only one row has it."""
    best: dict[str, str] = {}
    for col in table.columns:
        means = [row.mean[col.metric] for row in table.rows if col.metric in row.mean]
        if len(means) > 1:
            best[col.metric] = fmt(max(means))
    return best


def _cell(row: Row, metric: str, best: dict[str, str], bold: Callable[[str], str], pm: str) -> str:
    if metric not in row.mean:
        return "–"
    mean = fmt(row.mean[metric])
    shown = bold(mean) if best.get(metric) == mean else mean
    return f"{shown} {pm} {fmt(row.std[metric])}" if metric in row.std else shown


def _delta(table: AblationTable, i: int, dagger: str) -> str:
    row, main = table.rows[i], table.main
    if i == table.baseline:
        return "baseline"
    if main is None or main.metric not in row.delta:
        return "–"
    t, delta = row.test, fmt_delta(row.delta[main.metric])
    if t is None:
        return delta
    return f"{delta}{dagger if t.significant else ''} [{fmt_delta(t.low)}, {fmt_delta(t.high)}]"


def _header(table: AblationTable) -> list[str]:
    tested = any(row.test is not None for row in table.rows)
    ci = f" [{CONFIDENCE:.0%} CI]" if tested else ""
    main = [f"Δ {table.main.title}{ci}"] if table.main is not None else []
    return [axis_title(a) for a in table.row_axes] + ["n"] + [c.title for c in table.columns] + main


def _label_cells(row: Row) -> list[str]:
    return [str(v) for v in row.values] or ["all runs"]


def notes(table: AblationTable) -> list[str]:
    """The footnotes, as plain text (each renderer escapes them its own way)."""
    out: list[str] = []
    coll = table.collected
    seed_values = [", ".join(str(v) for v in coll.grid[a]) for a in table.replicate_axes]
    over = "; ".join(
        f"{axis_title(a)} in {{{v}}}" for a, v in zip(table.replicate_axes, seed_values)
    )
    metrics = {c.metric for c in table.columns}
    what = (
        "the mteb category means (eval/<Category>)"
        if table.kind == "ablation"
        else "each task's mteb main score (eval/<Task>)"
    )
    meaning = [what] if any(m not in (AVG, HELDOUT) for m in metrics) else []
    if AVG in metrics:
        meaning.append("Avg = the mean over all tasks (eval/avg)")
    if HELDOUT in metrics:
        meaning.append(
            "Held-out R@1 = recall@1 on the corpus rows held out of training (heldout/recall_at_1)"
        )
    out.append(
        "Scores x100. Each cell: mean ± sample standard deviation over the n runs of the row"
        + (f" ({over})" if over else "")
        + f". Bold: the best mean of its column. Columns: {'; '.join(meaning)}."
    )
    if table.main is not None:
        base = table.rows[table.baseline]
        how = (
            "tables.baseline"
            if table.baseline_from_file
            else "the first row; set tables.baseline to choose"
        )
        out.append(
            f"Δ {table.main.title}: the row's mean minus the baseline's ({base.label}; {how})"
            + (
                f"; in brackets the {CONFIDENCE:.0%} interval of the paired difference (the seeds"
                f" both rows have; see {DAGGER})."
                if any(row.test is not None for row in table.rows)
                else "."
            )
        )
        tested = [(row, row.test) for row in table.rows if row.test is not None]
        if tested:
            by_task = table.main.metric == AVG
            unit, pairs = ("task", "same seed, same task") if by_task else ("value", "same seed")
            intervals = "; ".join(
                f"{row.label} {fmt_delta(t.diff)} [{fmt_delta(t.low)}, {fmt_delta(t.high)}]"
                f" ({t.replicates} seeds x {t.tasks} {unit}{'s' if t.tasks > 1 else ''},"
                f" sign-flip p = {t.p_value:.3g})"
                for row, t in tested
            )
            out.append(
                f"{DAGGER}: the {CONFIDENCE:.0%} paired cluster-bootstrap interval of the mean difference "
                f"to the baseline excludes 0 (pairs: {pairs}; seeds resampled, each with all its "
                f"{unit}s, since a seed's {unit}s share one model; {BOOTSTRAP_RESAMPLES} resamples, "
                f"RNG seed {BOOTSTRAP_SEED}) and so does the exact sign-flip test over the seeds' mean "
                f"differences (p < {1 - CONFIDENCE:.2g}; it cannot go below 2/2^seeds, so a † needs at "
                f"least 6 seeds that agree: with fewer, read the intervals as descriptive). "
                f"Intervals: {intervals}."
            )
        elif len(table.rows) > 1:
            out.append("No significance test: it needs at least 2 seeds shared with the baseline.")
    missing = table.missing
    total = len(coll.cells)
    if missing:
        out.append(
            f"Missing: {len(missing)} of {total} grid cells have no FINISHED run and are not in the means: "
            + "; ".join(_why(c) for c in missing)
            + "."
        )
    else:
        out.append(f"All {total} grid cells have a FINISHED run.")
    gaps = [
        f"{c.label} ({col.title})"
        for row in table.rows
        for c in row.cells
        for col in table.columns
        if c.run is not None and col.metric not in c.run.metrics
    ]
    if gaps:
        out.append(
            "Runs without a column's metric (left out of that column): " + "; ".join(gaps) + "."
        )
    out.append(_source(table))
    return out


def _why(cell: CellRuns) -> str:
    run = cell.latest
    if run is None:
        return f"{cell.label} (never run)"
    error = (run.error or "").strip().splitlines()
    detail = f": {error[0][:160]}" if error else ""
    return f"{cell.label} ({run.status}{detail})"


def _source(table: AblationTable) -> str:
    coll = table.collected
    used = sum(c.run is not None for c in coll.cells)
    passed = sum(c.superseded for c in coll.cells)
    text = (
        f"Source: MLflow experiment {coll.experiment!r} at {redact_text(coll.tracking_uri)}; for "
        "each grid cell the newest "
        f"FINISHED trial run ({used} runs"
        + (f"; {passed} older or superseded runs passed over" if passed else "")
        + f"). Row and column order: grid from {coll.grid_source}."
    )
    stale = [c.label for c in coll.cells if c.matches_file is False]
    if stale:
        text += (
            " Trained with an older configuration than the experiment's current one"
            f" (trial_key differs): {', '.join(stale)}."
        )
    if coll.extra_runs:
        text += f" {coll.extra_runs} FINISHED runs outside the grid are not shown."
    return text


# ---------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(table: AblationTable) -> str:
    best = _best(table)
    header = _header(table)
    n_label = len(table.row_axes) or 1
    align = [":--"] * n_label + ["--:"] * (len(header) - n_label)
    description = table.collected.description
    lines = [
        f"# {table.experiment}: {_what(table)}",
        "",
        *([description, ""] if description else []),
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join(align) + "|",
    ]
    for i, row in enumerate(table.rows):
        cells = [*_label_cells(row), str(len(row.runs))]
        cells += [_cell(row, c.metric, best, lambda s: f"**{s}**", "±") for c in table.columns]
        if table.main is not None:
            cells.append(_delta(table, i, DAGGER))
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    lines.append("")
    lines += [f"{i}. {_md_escape(n)}" for i, n in enumerate(notes(table), 1)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CSV


def csv_text(table: AblationTable) -> str:
    """One line per row; raw values: ``<metric>_mean/_std/_n/_delta``, then the test of the main metric."""
    header = [axis_title(a) for a in table.row_axes] + ["runs", "baseline"]
    for c in table.columns:
        header += [f"{c.metric}_mean", f"{c.metric}_std", f"{c.metric}_n", f"{c.metric}_delta"]
    header += [
        "test_metric",
        "test_diff",
        "test_ci_low",
        "test_ci_high",
        "test_pairs",
        "test_seeds",
        "test_sign_flip_p",
        "significant",
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for i, row in enumerate(table.rows):
        line: list[object] = [_csv_value(v) for v in row.values] + [
            len(row.runs),
            int(i == table.baseline),
        ]
        for c in table.columns:
            line += [
                _num(row.mean.get(c.metric)),
                _num(row.std.get(c.metric)),
                row.count.get(c.metric, 0),
                _num(row.delta.get(c.metric)),
            ]
        t = row.test
        line += [table.main.metric if table.main else ""]
        line += (
            [
                _num(t.diff),
                _num(t.low),
                _num(t.high),
                t.pairs,
                t.replicates,
                _num(t.p_value),
                int(t.significant),
            ]
            if t
            else [""] * 7
        )
        writer.writerow(line)
    return buf.getvalue()


def _csv_value(value: object) -> object:
    return value if isinstance(value, (str, int, float)) else json.dumps(value, default=str)


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


# ---------------------------------------------------------------- LaTeX


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "Δ": r"$\Delta$", DAGGER: r"$^\dagger$", "–": "--", "<": r"$<$", ">": r"$>$",
}  # fmt: skip


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def latex(table: AblationTable) -> str:
    best = _best(table)
    header = _header(table)
    n_label = len(table.row_axes) or 1
    lines = [
        f"% Generated by `harness tables` from the MLflow experiment {table.experiment!r}; do not edit.",
        "% Needs \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        "\\begin{tabular}{" + "l" * n_label + "r" * (len(header) - n_label) + "}",
        "\\toprule",
        " & ".join(latex_escape(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    for i, row in enumerate(table.rows):
        cells = [latex_escape(c) for c in _label_cells(row)] + [str(len(row.runs))]
        cells += [
            _cell(row, c.metric, best, lambda s: f"\\textbf{{{s}}}", "$\\pm$")
            for c in table.columns
        ]
        if table.main is not None:
            cells.append(latex_escape(_delta(table, i, DAGGER)))
        lines.append(" & ".join(cells) + " \\\\")
    lines += [
        "\\bottomrule",
        "\\end{tabular}",
        f"\\caption{{{latex_escape(_caption(table))}"
        " (scores $\\times$100, mean $\\pm$ std over seeds).}",
        f"\\label{{tab:{_label(table)}}}",
        "\\par\\smallskip",
        "{\\footnotesize",
    ]
    lines += [f"{i}. {latex_escape(n)}\\par" for i, n in enumerate(notes(table), 1)]
    lines += ["}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def render_all(table: AblationTable) -> dict[str, str]:
    """File name -> text for the three table formats (``ablation.*`` or ``tasks.*``)."""
    return {
        f"{table.kind}.md": markdown(table),
        f"{table.kind}.csv": csv_text(table),
        f"{table.kind}.tex": latex(table),
    }


def _caption(table: AblationTable) -> str:
    """The experiment file's ``description`` (the per-task table says so), else name and kind."""
    description = table.collected.description.strip().rstrip(".")
    if not description:
        return f"{table.experiment}: {_what(table)}"
    return description if table.kind == "ablation" else f"{description}: {_what(table)}"


def _what(table: AblationTable) -> str:
    return (
        "ablation" if table.kind == "ablation" else "per-task scores (each task's mteb main score)"
    )


def _label(table: AblationTable) -> str:
    """A LaTeX label from the experiment name: ``tab:<name>-<kind>``, letters, digits and dashes."""
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{table.experiment}-{table.kind}").strip("-").lower()
