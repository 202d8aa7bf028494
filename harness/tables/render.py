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

from harness.tables import stats
from harness.tables.ablation import AVG, HELDOUT, AblationTable, Row, UntrainedRow, axis_title
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
    t, delta = row.seed_test, fmt_delta(row.delta[main.metric])
    if t is None:
        return delta
    low, high = t.interval
    return f"{delta}{dagger if t.significant else ''} [{fmt_delta(low)}, {fmt_delta(high)}]"


def _untrained_cells(table: AblationTable, arm: UntrainedRow) -> list[str]:
    """An untrained row: its label across the label columns, no n, its scores, no Δ."""
    labels = [arm.label] + [""] * (max(len(table.row_axes), 1) - 1)
    cells = [*labels, "–"] + [
        fmt(arm.mean[c.metric]) if c.metric in arm.mean else "–" for c in table.columns
    ]
    return cells + (["–"] if table.main is not None else [])


def _header(table: AblationTable) -> list[str]:
    tested = any(row.seed_test is not None for row in table.rows)
    ci = f" [{stats.CONFIDENCE:.0%} t-CI]" if tested else ""
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
        out += _test_notes(table)
    out += _untrained_notes(table)
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


def _test_notes(table: AblationTable) -> list[str]:
    """What the Δ column and the comparisons show, and which test answers which question."""
    assert table.main is not None
    base, title = table.rows[table.baseline], table.main.title
    how = (
        "tables.baseline"
        if table.baseline_from_file
        else "the first row; set tables.baseline to choose"
    )
    seed_tested = [row for row in table.rows if row.seed_test is not None]
    task_tested = [row for row in table.rows if row.task_test is not None]
    out = [
        f"Δ {title}: the row's mean minus the baseline's ({base.label}; {how})"
        + (
            f"; in brackets the {stats.CONFIDENCE:.0%} t-interval of the mean per-seed paired"
            " difference (the seeds both rows have)."
            if seed_tested
            else "."
        )
    ]
    if seed_tested:
        m = len(seed_tested)
        floor = stats.sign_flip_min_seeds(stats.ALPHA / m)
        unit = "the mean over the tasks both runs have" if table.main.metric == AVG else "the value"
        out.append(
            f"Over seeds (does the variant train better models, given training randomness?): per "
            f"seed, row minus baseline ({unit}); paired t-test over the seeds, effect size d_z = "
            f"mean / sd of the per-seed differences. {DAGGER}: Holm-adjusted p < {stats.ALPHA:g} "
            f"over the table's {m} comparison{'s' if m > 1 else ''}. The exact sign-flip test is "
            f"shown as a distribution-free check: with n seeds its p cannot go below 2/2^n, so it "
            f"needs {floor} seeds to pass Holm here."
        )
    if task_tested:
        out.append(
            "Over tasks (is the variant better across tasks? seeds averaged first): per task, the "
            "row's seed mean minus the baseline's over the seeds both have; Wilcoxon signed-rank "
            "test over the tasks (ties dropped), Holm-adjusted across the table's comparisons. It "
            "treats the tasks as the sample and says nothing about seed-to-seed variation."
        )
    if len(table.rows) > 1 and not seed_tested:
        out.append("No test over seeds: it needs at least 2 seeds shared with the baseline.")
    return out


def _untrained_notes(table: AblationTable) -> list[str]:
    if not table.untrained:
        return []
    text = (
        "Untrained (italics): the trials' own configuration before the first step (same template, "
        "lengths, attention, adapter and pooling; LoRA at its initial identity), scored once per "
        "arm and cached (eval_base/*, heldout_base/*); rows sharing their model settings share it."
    )
    varied = [arm.label for arm in table.untrained if arm.spread > 1e-9]
    if varied:
        text += f" Its score differs between runs of {', '.join(varied)} (older runs): the mean is shown."
    below = table.below_untrained()
    compared = [
        c
        for c in table.columns
        if (c == table.main or c.metric == HELDOUT)
        and any(c.metric in arm.mean for arm in table.untrained)
    ]
    if below:
        listed = "; ".join(
            f"{row} on {col.title} ({fmt(trained)} < {fmt(untrained)})"
            for row, col, trained, untrained in below
        )
        text += (
            f" Trained rows below their untrained model: {listed}. Where training makes the model "
            "worse, the table ranks which variant does the least damage, not which teaches most."
        )
    elif compared:
        text += (
            " Every trained row scores above its untrained model on "
            + " and ".join(c.title for c in compared)
            + "."
        )
    if table.main is not None and table.main not in compared:
        text += (
            f" The untrained model's {table.main.title} is not in the store (runs logged before "
            f"eval.untrained existed): whether training helps on {table.main.title} is not shown."
        )
    return [text]


def comparisons(table: AblationTable) -> list[list[str]]:
    """The comparisons with the baseline as a table (header first): one line per row and question."""
    if table.main is None:
        return []
    title = table.main.title
    header = [
        "vs " + table.rows[table.baseline].label, "question", "n", f"Δ {title}",
        f"{stats.CONFIDENCE:.0%} t-CI", "per seed / per task", "effect", "p", "p (Holm)", "check",
    ]  # fmt: skip
    lines = []
    for row in table.rows:
        t = row.seed_test
        if t is not None:
            low, high = t.interval
            dz = t.effect_size
            lines.append([
                row.label, "seeds", str(t.n), fmt_delta(t.diff) + (DAGGER if t.significant else ""),
                f"[{fmt_delta(low)}, {fmt_delta(high)}]",
                " ".join(f"{seed}: {fmt_delta(d)}" for seed, d in zip(t.seeds, t.diffs)),
                "d_z " + ("–" if dz is None else f"{dz:+.2f}"),
                f"t {_p(t.p_value)}", _p(t.p_holm), f"sign-flip {_p(t.sign_flip_p)}",
            ])  # fmt: skip
        k = row.task_test
        if k is not None:
            lines.append([
                row.label, f"tasks ({k.seeds} seeds averaged)", str(len(k.diffs)),
                fmt_delta(k.diff) + (DAGGER if k.significant else ""), "–",
                f"{k.wins} better, {k.ties} tied, {k.losses} worse", "–",
                f"Wilcoxon {_p(k.p_value)}", _p(k.p_holm), "–",
            ])  # fmt: skip
    return [header, *lines] if lines else []


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


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
    if coll.keys_unknown:
        text += (
            " Cannot check whether the runs were trained with the file's current configuration: "
            f"{coll.keys_unknown}."
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
    for arm in table.untrained:
        cells = _untrained_cells(table, arm)
        cells[0] = f"*{cells[0]}*"
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    lines.append("")
    compared = comparisons(table)
    if compared:
        lines += [
            "Comparisons with the baseline (the notes say which test answers which question):",
            "",
        ]
        lines.append("| " + " | ".join(_md_escape(c) for c in compared[0]) + " |")
        lines.append("|" + "|".join([":--", ":--"] + ["--:"] * (len(compared[0]) - 2)) + "|")
        lines += ["| " + " | ".join(_md_escape(c) for c in line) + " |" for line in compared[1:]]
        lines.append("")
    lines += [f"{i}. {_md_escape(n)}" for i, n in enumerate(notes(table), 1)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CSV


SEED_CSV = ("seed_n", "seed_diff", "seed_ci_low", "seed_ci_high", "seed_diffs", "seed_dz",
            "seed_t_p", "seed_p_holm", "seed_sign_flip_p", "seed_significant")  # fmt: skip
TASK_CSV = ("task_n", "task_seeds", "task_diff", "task_wins", "task_ties", "task_losses",
            "task_wilcoxon_p", "task_p_holm", "task_significant")  # fmt: skip


def csv_text(table: AblationTable) -> str:
    """One line per row; raw values: ``<metric>_mean/_std/_n/_delta``, then both tests of the main
    metric (``seed_*``: over seeds, ``seed_diffs`` as ``seed=diff`` pairs; ``task_*``: over tasks)."""
    header = [axis_title(a) for a in table.row_axes] + ["runs", "baseline", "untrained"]
    for c in table.columns:
        header += [f"{c.metric}_mean", f"{c.metric}_std", f"{c.metric}_n", f"{c.metric}_delta"]
    header += ["test_metric", *SEED_CSV, *TASK_CSV]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for i, row in enumerate(table.rows):
        line: list[object] = [_csv_value(v) for v in row.values] + [
            len(row.runs),
            int(i == table.baseline),
            0,
        ]
        for c in table.columns:
            line += [
                _num(row.mean.get(c.metric)),
                _num(row.std.get(c.metric)),
                row.count.get(c.metric, 0),
                _num(row.delta.get(c.metric)),
            ]
        line += [table.main.metric if table.main else ""]
        t, k = row.seed_test, row.task_test
        if t is not None:
            low, high = t.interval
            diffs = ";".join(f"{seed}={d!r}" for seed, d in zip(t.seeds, t.diffs))
            line += [t.n, _num(t.diff), _num(low), _num(high), diffs, _num(t.effect_size),
                     _num(t.p_value), _num(t.p_holm), _num(t.sign_flip_p), int(t.significant)]  # fmt: skip
        else:
            line += [""] * len(SEED_CSV)
        if k is not None:
            line += [len(k.diffs), k.seeds, _num(k.diff), k.wins, k.ties, k.losses,
                     _num(k.p_value), _num(k.p_holm), int(k.significant)]  # fmt: skip
        else:
            line += [""] * len(TASK_CSV)
        writer.writerow(line)
    for arm in table.untrained:  # its arm's values on the model axes, the others empty
        first = table.rows[arm.rows[0]]
        values = [
            _csv_value(v) if a.startswith("model.") else ""
            for a, v in zip(table.row_axes, first.values)
        ]
        line = [*values, arm.runs, 0, 1]
        for c in table.columns:
            line += [_num(arm.mean.get(c.metric)), "", int(c.metric in arm.mean), ""]
        writer.writerow(line + [""] * (1 + len(SEED_CSV) + len(TASK_CSV)))
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
    if table.untrained:
        lines.append("\\midrule")
    for arm in table.untrained:
        cells = [latex_escape(c) for c in _untrained_cells(table, arm)]
        cells[0] = f"\\textit{{{cells[0]}}}"
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
