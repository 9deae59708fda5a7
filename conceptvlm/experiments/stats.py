"""Paired-seed statistics and per-claim verdicts (issue 16).

Variants of one experiment train with the same seeds, and seed ``s`` fixes the data
order for every variant (``data.seed = s``), so the per-seed difference between two
variants cancels the data-order noise they share. A claim "A < B" (lower is better) is
judged on the paired differences ``d_s = A_s - B_s``: their mean and a two-sided 95%
t-interval. The interval entirely below 0: **holds**; entirely above: **does not hold**;
otherwise **inconclusive**. Never the best of several variants against another: each
claim names its variants in advance (in the experiment YAML).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
MIN_SEEDS_HEADLINE = 5


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t critical value (``scipy.stats.t``)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Paired:
    """Summary of paired differences ``a - b`` over seeds."""

    n: int
    mean: float
    sd: Optional[float]  # None with one seed
    lo: float  # 95% interval (nan with fewer than 2 seeds)
    hi: float

    def fmt(self, nd: int = 3, unit: str = "") -> str:
        if self.n == 0:  # one side has no rows yet (a table still being run)
            return "none yet (no seed has rows for both)"
        if self.n < 2:
            return f"{self.mean:+.{nd}f}{unit} (1 seed, no interval)"
        return f"{self.mean:+.{nd}f}{unit} [95% CI {self.lo:+.{nd}f}, {self.hi:+.{nd}f}] over {self.n} seeds"


def mean_sd(xs: Sequence[float]) -> tuple[float, Optional[float]]:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not xs:
        return float("nan"), None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def paired(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> Paired:
    """Paired differences of two ``{seed: value}`` maps over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return Paired(0, float("nan"), None, float("nan"), float("nan"))
    m, sd = mean_sd(d)
    if sd is None:
        return Paired(len(d), m, None, float("nan"), float("nan"))
    half = t_quantile(len(d) - 1, level) * sd / math.sqrt(len(d))
    return Paired(len(d), m, sd, m - half, m + half)


def verdict_less(p: Paired) -> str:
    """Claim ``a < b`` from the interval of ``a - b``."""
    if p.n < 2 or not math.isfinite(p.lo):
        return INCONCLUSIVE
    if p.hi < 0:
        return HOLDS
    if p.lo > 0:
        return FAILS
    return INCONCLUSIVE


def verdict_not_worse(p: Paired, margin: float) -> str:
    """Claim ``a >= b - margin`` (non-inferiority, higher is better) from the interval of
    ``a - b``: holds when the whole interval is above ``-margin``, fails when it is all
    below 0 (``a`` measurably worse)."""
    if p.n < 2 or not math.isfinite(p.lo):
        return INCONCLUSIVE
    if p.lo > -margin:
        return HOLDS
    if p.hi < 0:
        return FAILS
    return INCONCLUSIVE


def verdict_within(values: Sequence[float], target: float, tol: float, level: float = 0.95) -> tuple[str, float, float]:
    """Claim "the mean of ``values`` is within ``tol`` (relative) of ``target``": holds when
    the interval of the relative error lies inside ``[-tol, tol]``, fails when it lies
    wholly outside. Returns (verdict, lo, hi) of the relative error."""
    rel = [v / target - 1.0 for v in values]
    if len(rel) < 2:
        return INCONCLUSIVE, float("nan"), float("nan")
    m, sd = mean_sd(rel)
    half = t_quantile(len(rel) - 1, level) * (sd or 0.0) / math.sqrt(len(rel))
    lo, hi = m - half, m + half
    if -tol <= lo and hi <= tol:
        return HOLDS, lo, hi
    if hi < -tol or lo > tol:
        return FAILS, lo, hi
    return INCONCLUSIVE, lo, hi


def combine(verdicts: Sequence[str]) -> str:
    """A chain "a < b < c" from its links: holds if all hold, fails if any fails."""
    if any(v == FAILS for v in verdicts):
        return FAILS
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE


def seeds_needed(sd: Optional[float], effect: float, level: float = 0.95, minimum: int = MIN_SEEDS_HEADLINE,
                 cap: int = 50) -> Optional[int]:
    """Smallest n (>= ``minimum``) whose paired 95% half-width ``t(n-1) sd / sqrt(n)`` is
    below ``|effect|``, the difference the claim must resolve; ``None`` when even
    ``cap`` seeds would not (or when no spread is measured yet)."""
    if sd is None or not math.isfinite(sd) or effect == 0:
        return None
    for n in range(max(2, minimum), cap + 1):
        if t_quantile(n - 1, level) * sd / math.sqrt(n) < abs(effect):
            return n
    return None
