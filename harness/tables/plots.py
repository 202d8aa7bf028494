"""The figures of an ablation: training loss per variant, the main score per variant, and every
column (mteb categories, Avg, held-out) as bars grouped by column.

Figures are drawn on matplotlib's Agg canvas without pyplot (no global state, no display needed),
at a fixed size and dpi, and saved as PNG plus vector PDF and SVG twins (for papers) without
creation dates, software tags or random SVG ids, so the same runs always give the same bytes.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harness.tables.ablation import AblationTable
from harness.tables.render import SCALE

FIGSIZE = (6.4, 4.0)
DPI = 300
METADATA: dict[str, dict[str, str | None]] = {  # what would change between identical runs
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
    "svg": {"Creator": None, "Date": None},
}
VECTOR_FORMATS = ("pdf", "svg")


def _save(fig: Figure, path: Path) -> Path:
    """``path`` (PNG) and its PDF and SVG twins beside it; returns the PNG."""
    with rc_context({"svg.hashsalt": "harness", "pdf.compression": 6}):
        for fmt, target in (
            ("png", path),
            *((f, path.with_suffix(f".{f}")) for f in VECTOR_FORMATS),
        ):
            fig.savefig(target, format=fmt, dpi=DPI, metadata=METADATA[fmt])
    return path


def over_seeds(counts: Sequence[int]) -> str:
    """What the bars and bands show: "mean ± std over seeds", or "one seed" when every n is 1."""
    return "one seed each (no spread)" if max(counts, default=0) <= 1 else "mean ± std over seeds"


def mean_curve(
    histories: Sequence[Sequence[tuple[int, float]]],
) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std over the runs that logged each step (runs may stop at different steps)."""
    by_step: dict[int, list[float]] = {}
    for history in histories:
        for step, value in history:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    means = [statistics.fmean(by_step[s]) for s in steps]
    stds = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return steps, means, stds


def loss_plot(
    table: AblationTable, losses: Mapping[str, list[tuple[int, float]]], path: Path
) -> Path | None:
    """Mean ``train/loss`` over seeds per variant, a band of ± one std; ``None`` without any loss."""
    curves = [
        (row.label, [losses[r.run_id] for r in row.runs if losses.get(r.run_id)])
        for row in table.rows
    ]
    curves = [(label, hs) for label, hs in curves if hs]
    if not curves:
        return None
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    for label, histories in curves:
        steps, means, stds = mean_curve(histories)
        (line,) = ax.plot(steps, means, label=f"{label} (n={len(histories)})", linewidth=1.5)
        if len(histories) > 1:
            low = [m - s for m, s in zip(means, stds)]
            high = [m + s for m, s in zip(means, stds)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (InfoNCE)")
    ax.set_title(f"{table.experiment}: training loss, {over_seeds([len(hs) for _, hs in curves])}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def score_plot(table: AblationTable, path: Path) -> Path | None:
    """Bars of the main metric (Avg, else held-out R@1) per variant with ± std error bars."""
    main = table.main
    if main is None:
        return None
    rows = [row for row in table.rows if main.metric in row.mean]
    if not rows:
        return None
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    base = table.rows[table.baseline]
    x = list(range(len(rows)))
    heights = [SCALE * row.mean[main.metric] for row in rows]
    # A single run has no spread: no error bar rather than a misleading zero-width one.
    errors = [
        SCALE * row.std.get(main.metric, 0.0) if row.count[main.metric] > 1 else 0.0 for row in rows
    ]
    colors = ["0.6" if row is base else "C0" for row in rows]
    best = max(heights)
    edges = ["black" if h == best and len(rows) > 1 else "none" for h in heights]
    ax.bar(
        x, heights, yerr=errors if any(errors) else None, capsize=4, color=colors,
        edgecolor=edges, linewidth=1.5,
    )  # fmt: skip
    labels = [f"{row.label.replace(' / ', chr(10))}\n(n={row.count[main.metric]})" for row in rows]
    ax.set_xticks(x, labels, fontsize="small")
    counts = [row.count[main.metric] for row in rows]
    ax.set_title(
        f"{table.experiment}: {main.title}, {over_seeds(counts)}\n(grey: baseline; outlined: best mean)",
        fontsize="medium",
    )
    ax.grid(axis="y", alpha=0.3)
    low = min(h - e for h, e in zip(heights, errors))
    high = max(h + e for h, e in zip(heights, errors))
    pad = max(high - low, 1.0) * 0.15
    # Differences are often small: zoom in, but never hide a negative score below the axis.
    bottom = low - pad if low < 0 else max(0.0, low - pad)
    ax.set_ylim(bottom, max(high + pad, 0.0))
    if bottom < 0:
        ax.axhline(0.0, color="0.3", linewidth=0.8)
    cut = " (x100; the axis does not start at 0)" if bottom > 0 else " (x100)"
    ax.set_ylabel(main.title + cut)
    return _save(fig, path)


def category_plot(table: AblationTable, path: Path) -> Path | None:
    """Grouped bars: one group per table column (the mteb categories, Avg, held-out R@1), one bar
    per variant with ± std error bars; the best mean of each group outlined. ``None`` with fewer
    than two columns (the score plot already shows the one)."""
    columns = [c for c in table.columns if any(c.metric in row.mean for row in table.rows)]
    if len(columns) < 2 or not table.rows:
        return None
    fig = Figure(figsize=(max(FIGSIZE[0], 1.2 * len(columns) + 2), FIGSIZE[1]), dpi=DPI,
                 layout="constrained")  # fmt: skip
    ax = fig.add_subplot()
    width = 0.8 / len(table.rows)
    for i, row in enumerate(table.rows):
        x = [j + (i - (len(table.rows) - 1) / 2) * width for j in range(len(columns))]
        heights = [SCALE * row.mean.get(c.metric, float("nan")) for c in columns]
        errors = [
            SCALE * row.std[c.metric] if row.count.get(c.metric, 0) > 1 else 0.0 for c in columns
        ]
        best = [
            row.mean.get(c.metric)
            == max(r.mean[c.metric] for r in table.rows if c.metric in r.mean)
            for c in columns
        ]
        ax.bar(
            x, heights, width, yerr=errors if any(errors) else None, capsize=2,
            label=f"{row.label} (n={len(row.runs)})",
            edgecolor=["black" if b and len(table.rows) > 1 else "none" for b in best],
            linewidth=1.2,
        )  # fmt: skip
    ax.set_xticks(range(len(columns)), [c.title for c in columns], fontsize="small")
    counts = [row.count.get(c.metric, 0) for row in table.rows for c in columns]
    ax.set_title(
        f"{table.experiment}: every column, {over_seeds(counts)} (outlined: best mean)",
        fontsize="medium",
    )
    ax.set_ylabel("score (x100)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
