"""``harness plan``: how many seeds each comparison of a table needs, and what they would cost,
from the trials already in the store, before anyone spends the compute.

For each row compared with the baseline (the table's own comparisons, ``tables.baseline``), the
per-seed paired differences of the main metric give an effect size d_z = mean / sd; with
``--effect`` the mean is replaced by the smallest difference worth detecting (the sd is still the
observed one: an effect estimated from 3 seeds is the noisiest number in the table, and planning
on it alone chases noise). :func:`harness.tables.stats.seeds_needed` then gives the seeds for a
two-sided paired t-test at ``alpha / m`` (Bonferroni over the table's m comparisons, the level of
Holm's first step) with the wanted power. The cost comes from the measured wall time of the
FINISHED trials of each row (median), the experiment's resources and a concurrency.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from harness.config import Experiment
from harness.tables import stats
from harness.tables.ablation import AblationTable, Row, build_table
from harness.tables.collect import collect


class PlanError(RuntimeError):
    """Nothing to plan from: no comparison with two or more seeds."""


@dataclass(frozen=True)
class ComparisonPlan:
    label: str  # the row compared with the baseline
    seeds: int  # seeds both rows have now
    diff: float  # observed mean per-seed difference
    sd: float | None  # observed sd of the per-seed differences
    planned_diff: float  # the difference planned for (observed, or --effect)
    needed: int | None  # seeds for the wanted power (None: more than stats.MAX_SEEDS, or no effect)

    @property
    def dz(self) -> float | None:
        if self.sd is None:
            return None
        if self.sd == 0:
            return math.inf if self.planned_diff else None
        return self.planned_diff / self.sd


@dataclass(frozen=True)
class Plan:
    experiment: str
    metric: str
    baseline: str
    alpha: float
    power: float
    family: int  # comparisons in the table (m)
    comparisons: list[ComparisonPlan]
    rows: int  # trials per seed (the table's rows)
    have: int  # seeds every row has now
    trial_hours: dict[str, float]  # row label -> median hours of its FINISHED trials
    per_trial: dict[str, float]  # the experiment's resources of one trial (all its workers)
    concurrent: int
    effect_given: bool

    @property
    def level(self) -> float:
        return self.alpha / self.family

    @property
    def needed(self) -> int | None:
        """Seeds the experiment needs: the most any comparison needs (None: one is out of reach)."""
        if any(c.needed is None for c in self.comparisons):
            return None
        return max(c.needed for c in self.comparisons)  # type: ignore[type-var]

    @property
    def more(self) -> int:
        needed = self.needed
        return 0 if needed is None else max(0, needed - self.have)

    @property
    def hours_per_seed(self) -> float:
        return sum(self.trial_hours.values())

    @property
    def wall_hours(self) -> float:
        """Wall time of the extra seeds: the extra trials in waves of ``concurrent``."""
        if not self.more or not self.trial_hours:
            return 0.0
        per_trial = self.hours_per_seed / len(self.trial_hours)
        return math.ceil(self.more * self.rows / self.concurrent) * per_trial


def make_plan(
    exp: Experiment,
    *,
    tracking_uri: str | None = None,
    alpha: float = stats.ALPHA,
    power: float = 0.8,
    effect: float | None = None,
    concurrent: int | None = None,
) -> Plan:
    """The plan for ``exp``'s table from the store's finished trials (the store is only read).

    Args:
        effect: the difference to detect, in the metric's own units (0.01 = one point x100);
            default: each comparison's observed mean difference.
        concurrent: trials run at once; default ``resources.max_concurrent_trials``, else 1.
    """
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha} and {power}")
    table = build_table(collect(exp, None, tracking_uri), exp.source or exp.name)
    tested = [row for row in table.rows if row.seed_test is not None]
    if table.main is None or not tested:
        raise PlanError(
            f"{exp.source or exp.name}: no comparison with the baseline has 2 seeds yet; "
            "run 2 seeds of every row first (the plan needs the spread of per-seed differences)"
        )
    level = alpha / len(tested)
    comparisons = [_comparison(row, effect, level, power) for row in tested]
    have = min((len(row.runs) for row in table.rows), default=0)
    resources = exp.resources
    workers = resources.workers_per_trial
    per_trial = {k: v * workers for k, v in resources.per_worker().items()}
    return Plan(
        experiment=table.experiment,
        metric=table.main.title,
        baseline=table.rows[table.baseline].label,
        alpha=alpha,
        power=power,
        family=len(tested),
        comparisons=comparisons,
        rows=len(table.rows),
        have=have,
        trial_hours=_trial_hours(table),
        per_trial=per_trial,
        concurrent=concurrent or resources.max_concurrent_trials or 1,
        effect_given=effect is not None,
    )


def _comparison(row: Row, effect: float | None, level: float, power: float) -> ComparisonPlan:
    t = row.seed_test
    assert t is not None
    sd = stats.sd(t.diffs)
    planned = t.diff if effect is None else math.copysign(abs(effect), t.diff or 1.0)
    plan = ComparisonPlan(row.label, t.n, t.diff, sd, planned, None)
    dz = plan.dz
    needed = None if dz is None else stats.seeds_needed(dz, level, power)
    return ComparisonPlan(row.label, t.n, t.diff, sd, planned, needed)


def _trial_hours(table: AblationTable) -> dict[str, float]:
    """Per row, the median wall time of its FINISHED trials, in hours."""
    out = {}
    for row in table.rows:
        times = [r.end_time - r.start_time for r in row.runs if r.end_time > r.start_time]
        if times:
            out[row.label] = statistics.median(times) / 3_600_000
    return out


def render(plan: Plan) -> str:
    """The plan as text for a terminal (Markdown tables, readable raw)."""
    x = 100.0
    lines = [
        f"# plan: {plan.experiment}, {plan.metric} against {plan.baseline}",
        "",
        f"Paired t-test over seeds, two-sided, power {plan.power:.0%} at alpha {plan.alpha:g} "
        f"over {plan.family} comparison{'s' if plan.family > 1 else ''} (Holm; planned at "
        f"alpha/m = {plan.level:.3g}, Holm's first step). Effect: "
        + (
            "the given --effect, with each comparison's observed sd."
            if plan.effect_given
            else "each comparison's observed mean and sd (from few seeds: imprecise; "
            "pass --effect for the smallest difference worth detecting)."
        ),
        "",
        "| comparison | seeds now | Δ observed | sd | Δ planned | d_z | seeds needed |",
        "|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for c in plan.comparisons:
        dz = c.dz
        lines.append(
            f"| {c.label} | {c.seeds} | {x * c.diff:+.2f} | "
            + ("–" if c.sd is None else f"{x * c.sd:.2f}")
            + f" | {x * c.planned_diff:+.2f} | "
            + ("–" if dz is None else f"{dz:+.2f}")
            + f" | {_needed(c.needed)} |"
        )
    floor = stats.sign_flip_min_seeds(plan.level)
    lines += [
        "",
        f"An exact sign-flip test over seeds cannot reject at alpha/m below {floor} seeds.",
        "The question over tasks needs tasks, not seeds: its n is the evaluation suite's size.",
        "",
    ]
    needed = plan.needed
    if needed is None:
        lines.append(
            f"Out of reach: at least one comparison needs more than {stats.MAX_SEEDS} seeds "
            "(or shows no difference); plan for a larger effect with --effect, or drop it."
        )
        return "\n".join(lines) + "\n"
    if not plan.more:
        lines.append(f"The store has {plan.have} seeds per row: enough ({needed} needed).")
        return "\n".join(lines) + "\n"
    trials = plan.more * plan.rows
    lines.append(
        f"Seeds: {needed} (the store has {plan.have} per row): {plan.more} more x "
        f"{plan.rows} rows = {trials} trials."
    )
    if not plan.trial_hours:
        lines.append("Cost: unknown (no FINISHED trial has a recorded end time).")
        return "\n".join(lines) + "\n"
    measured = ", ".join(f"{row} {60 * h:.1f} min" for row, h in plan.trial_hours.items())
    hours = plan.more * plan.hours_per_seed
    lines.append(f"Measured trial time (median of FINISHED runs): {measured}.")
    lines.append(f"Cost: {hours:.1f} trial-hours" + "".join(_resource_hours(plan, hours)) + ".")
    lines.append(
        f"Wall time at {plan.concurrent} concurrent trial{'s' if plan.concurrent > 1 else ''}: "
        f"{_duration(plan.wall_hours)} (set --concurrent to what the cluster runs at once)."
    )
    return "\n".join(lines) + "\n"


def _needed(n: int | None) -> str:
    return f"> {stats.MAX_SEEDS}" if n is None else str(n)


def _resource_hours(plan: Plan, hours: float) -> Sequence[str]:
    gpus, cpus = plan.per_trial.get("GPU", 0.0), plan.per_trial.get("CPU", 0.0)
    if gpus:
        return [f" = {gpus * hours:.1f} GPU-hours ({gpus:g} GPU per trial)"]
    return [f" = {cpus * hours:.1f} CPU core-hours ({cpus:g} CPU per trial)"]


def _duration(hours: float) -> str:
    return f"{60 * hours:.0f} min" if hours < 1 else f"{hours:.1f} h"
