"""The statistics behind the ablation tables and ``harness plan``, in one place.

A table compares each row with its baseline row, paired, and asks two questions:

- **over seeds** ("does this variant train better models, given training randomness?"): per seed,
  the difference of the two rows' main metric (for ``eval/avg``: the mean over the tasks both
  have); a paired t-test and t-interval over those per-seed differences, the effect size
  d_z = mean / sd, and the exact sign-flip (permutation) test as a distribution-free check. With
  n seeds the sign-flip p cannot go below 2 / 2^n, and a percentile bootstrap over 3 seeds is only
  the range of the 3 differences (it covers the true mean ~75 % of the time), so neither is used
  for the interval.
- **over tasks** ("is it better across tasks?", the question of a paper-scale run with 1-3 seeds
  on dozens of tasks): per task, the difference of the seed-averaged scores, and the Wilcoxon
  signed-rank test over tasks (Demšar, "Statistical Comparisons of Classifiers over Multiple Data
  Sets", JMLR 2006: the test for two methods over many data sets). It says nothing about seeds.

Within a table the comparisons of one question share a family: Holm's step-down correction
(Holm 1979) adjusts their p-values, and only an adjusted p below ``ALPHA`` counts as significant.

Planning (``harness plan``) inverts the seed-level test: the smallest number of seeds at which a
two-sided paired t-test at level ``alpha / m`` reaches the wanted power for an effect of size d_z
(noncentral t). ``alpha / m`` is Bonferroni, the level of Holm's first step: the seeds that
guarantee the power under Bonferroni guarantee it under Holm, which never rejects less.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

ALPHA = 0.05
CONFIDENCE = 1 - ALPHA
PERMUTATION_DRAWS = 100_000  # above EXACT_UP_TO seeds the sign-flip test samples sign assignments
EXACT_UP_TO = 16
RNG_SEED = 0  # the sampled sign-flip test draws the same signs every run (byte-identical tables)
MAX_SEEDS = 10_000  # planning gives up above this many seeds


def mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=float)))


def sd(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); None below two values."""
    return float(np.std(np.asarray(values, dtype=float), ddof=1)) if len(values) > 1 else None


def t_interval(diffs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The t-interval of the mean of ``diffs`` (two or more values): mean ± t(n-1) · sd / √n."""
    n, m, s = len(diffs), mean(diffs), sd(diffs)
    if s is None:
        raise ValueError("a t-interval needs at least two values")
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * s / math.sqrt(n)
    return m - half, m + half


def paired_t_p(diffs: Sequence[float]) -> float:
    """Two-sided p of the one-sample t-test that the mean of ``diffs`` is 0 (1.0 below two values;
    identical values: 0.0 unless they are all 0)."""
    if len(diffs) < 2:
        return 1.0
    m, s = mean(diffs), sd(diffs)
    if not s:
        return 1.0 if m == 0 else 0.0
    t = m / (s / math.sqrt(len(diffs)))
    return float(2 * stats.t.sf(abs(t), len(diffs) - 1))


def effect_size(diffs: Sequence[float]) -> float | None:
    """Cohen's d_z of paired differences: mean / sd (None when undefined)."""
    s = sd(diffs)
    if not s:
        return None
    return mean(diffs) / s


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided p of the paired sign-flip (permutation) test that the mean difference is 0: the
    share of the 2^n sign assignments whose |mean| is at least the observed one (exact up to
    ``EXACT_UP_TO`` values, else ``PERMUTATION_DRAWS`` seeded draws)."""
    values = np.asarray(diffs, dtype=float)
    n = len(values)
    if n == 0:
        return 1.0
    observed = abs(values.mean()) - 1e-12
    if n <= EXACT_UP_TO:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng(RNG_SEED).choice([-1, 1], size=(PERMUTATION_DRAWS, n))
    return float((np.abs((signs * values).mean(axis=1)) >= observed).mean())


def wilcoxon_p(diffs: Sequence[float]) -> float:
    """Two-sided p of the Wilcoxon signed-rank test over ``diffs`` (zeros dropped, exact where
    scipy can be); 1.0 when no difference is left."""
    values = [d for d in diffs if d != 0]
    if not values:
        return 1.0
    return float(stats.wilcoxon(values, zero_method="wilcox", alternative="two-sided").pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: the k-th smallest p times
    (m - k + 1), made monotone and capped at 1."""
    m = len(pvalues)
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def sign_flip_min_seeds(alpha: float) -> int:
    """The fewest values at which an exact two-sided sign-flip test can reach ``p < alpha`` at all
    (its smallest p is 2 / 2^n)."""
    n = 1
    while 2 / 2**n >= alpha:
        n += 1
    return n


def paired_power(dz: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs for a true effect d_z."""
    if n < 2:
        return 0.0
    df, nc = n - 1, abs(dz) * math.sqrt(n)
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_needed(dz: float, alpha: float = ALPHA, power: float = 0.8) -> int | None:
    """The fewest pairs (seeds) at which the two-sided paired t-test at ``alpha`` has ``power``
    against d_z; None when more than ``MAX_SEEDS`` would be needed (or d_z is 0)."""
    if dz == 0 or not math.isfinite(dz):
        return 2 if math.isinf(dz) else None
    lo, hi = 2, 2
    while paired_power(dz, hi, alpha) < power:  # grow, then bisect: power rises with n
        lo, hi = hi, hi * 2
        if hi > MAX_SEEDS:
            return (
                None
                if paired_power(dz, MAX_SEEDS, alpha) < power
                else _bisect(dz, lo, MAX_SEEDS, alpha, power)
            )
    return _bisect(dz, lo, hi, alpha, power)


def _bisect(dz: float, lo: int, hi: int, alpha: float, power: float) -> int:
    """The smallest n in [lo, hi] with enough power (power(hi) is enough)."""
    if paired_power(dz, lo, alpha) >= power:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if paired_power(dz, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi
