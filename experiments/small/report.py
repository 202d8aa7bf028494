"""Numbers for results/small/README.md, from the committed store (read through a copy: it is never
changed): per row of each ablation, mean ± sample std over seeds (n) of every task score and of
the held-out recall@1 before and after training, both of the table's paired comparisons, and the
pre-registered interaction of round 2: does the LLM2Vec conversion change ATA's lead?

The runs are the tables' own (``harness.tables.collect``): for each grid cell the newest FINISHED
run, rows in the experiment file's grid order.

    python experiments/small/report.py            # from the repository root, after run.sh
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from harness.experiment_file import load_experiment
from harness.init_adapter import pin_if_present
from harness.logs import quiet_logs
from harness.tables import stats
from harness.tables.ablation import AblationTable, build_table
from harness.tables.collect import TablesError, collect

ABLATIONS = ("pooling", "pooling-causal", "schedule")  # experiments/small/<name>.yaml
INTERACTION = ("pooling", "pooling-causal")  # bidirectional + MNTP, then its causal twin
METRICS = ("heldout_base/recall_at_1", "heldout/recall_at_1", "eval/BIOSSES", "eval/STS16",
           "eval/STSBenchmark", "eval/STS13", "eval/avg")  # fmt: skip


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def _table(path: Path, tracking_uri: str | None) -> tuple[str, AblationTable | None]:
    exp = load_experiment(path)
    pin_if_present(exp)
    try:
        return exp.name, build_table(collect(exp, None, tracking_uri), exp.source or exp.name)
    except TablesError:
        return exp.name, None


def interaction(first: Path, second: Path, tracking_uri: str | None = None) -> list[str]:
    """The difference of differences, seed by seed: for each row X of both tables,
    D_s = (baseline - X) in ``first`` minus (baseline - X) in ``second``, on the main metric; a
    paired t-test of D over the seeds both have, Holm over the rows (results/small/README.md,
    round 2, claim 2)."""
    (name_a, a), (name_b, b) = _table(first, tracking_uri), _table(second, tracking_uri)
    head = [f"## interaction: {name_a} minus {name_b}", ""]
    if a is None or b is None:
        return [*head, "not run yet", ""]
    base = a.rows[a.baseline].label
    found: list[tuple[str, list[str], list[float]]] = []
    for row in a.rows:
        other = next((r for r in b.rows if r.label == row.label), None)
        if row.seed_test is None or other is None or other.seed_test is None:
            continue
        theirs = dict(zip(other.seed_test.seeds, other.seed_test.diffs))
        seeds = [s for s in row.seed_test.seeds if s in theirs]
        ours = dict(zip(row.seed_test.seeds, row.seed_test.diffs))
        # seed_test.diffs are row - baseline: (baseline - X) is their negative
        found.append((row.label, seeds, [theirs[s] - ours[s] for s in seeds]))
    tested = [(label, seeds, d) for label, seeds, d in found if len(d) >= 2]
    adjusted = stats.holm([stats.paired_t_p(d) for _, _, d in tested])
    lines = [*head, f"(x100; D = ({base} - X) in {name_a} minus ({base} - X) in {name_b})", ""]
    for (label, seeds, d), p_holm in zip(tested, adjusted):
        low, high = stats.t_interval(d)
        dz = stats.effect_size(d)
        per_seed = ", ".join(f"{s}: {100 * v:+.2f}" for s, v in zip(seeds, d))
        lines.append(
            f"- X = {label}, {len(d)} seeds: D {100 * stats.mean(d):+.2f}, 95 % t-interval "
            f"[{100 * low:+.2f}, {100 * high:+.2f}], d_z {dz if dz is None else f'{dz:.2f}'} "
            f"({per_seed}); t-test p = {stats.paired_t_p(d):.3g}, Holm p = {p_holm:.3g}, "
            f"sign-flip p = {stats.sign_flip_p(d):.3g}"
        )
    return [*lines, ""]


def report(path: Path, tracking_uri: str | None = None) -> list[str]:
    """The report of one experiment file's table (its store, or ``tracking_uri``)."""
    name, table = _table(path, tracking_uri)
    if table is None:
        return [f"## {name}", "", "not run yet", ""]
    runs = [r for row in table.rows for r in row.runs]
    present = [m for m in METRICS if any(m in r.metrics for r in runs)]
    axis = "/".join(a.split(".")[-1] for a in table.row_axes)
    lines = [f"## {name} ({len(runs)} finished trials)", ""]
    lines.append("| " + " | ".join([axis, "n", *present]) + " |")
    lines.append("|" + "---|" * (len(present) + 2))
    for row in table.rows:
        cells = [fmt([r.metrics[m] for r in row.runs if m in r.metrics]) for m in present]
        lines.append("| " + " | ".join([row.label, str(len(row.runs)), *cells]) + " |")
    lines += ["", f"Against {table.rows[table.baseline].label} (x100; Holm within the table):", ""]
    for row in table.rows:
        t, k = row.seed_test, row.task_test
        if t is not None:
            low, high = t.interval
            per_seed = ", ".join(f"{s}: {100 * d:+.2f}" for s, d in zip(t.seeds, t.diffs))
            lines.append(
                f"- {row.label}, over seeds: Δ {100 * t.diff:+.2f}, 95 % t-interval "
                f"[{100 * low:+.2f}, {100 * high:+.2f}] ({per_seed}); t-test p = {t.p_value:.3g}, "
                f"Holm p = {t.p_holm:.3g}, sign-flip p = {t.sign_flip_p:.3g}"
            )
        if k is not None:
            lines.append(
                f"- {row.label}, over {len(k.diffs)} tasks ({k.seeds} seeds averaged): Δ "
                f"{100 * k.diff:+.2f}, {k.wins} better / {k.losses} worse; Wilcoxon p = "
                f"{k.p_value:.3g}, Holm p = {k.p_holm:.3g}"
            )
    return [*lines, ""]


def main() -> None:
    quiet_logs(False)
    out: list[str] = []
    for name in ABLATIONS:
        out += report(Path("experiments/small") / f"{name}.yaml")
    out += interaction(*(Path("experiments/small") / f"{name}.yaml" for name in INTERACTION))
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
