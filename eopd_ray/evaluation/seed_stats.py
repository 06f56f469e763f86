"""Statistics over seeds: mean, sample standard deviation, Student-t confidence intervals, and
paired differences between two methods run on the same seeds.

    summary = describe([0.79, 0.81, 0.77, 0.80, 0.78])      # mean, std, n, 95% CI
    diff = paired([0.80, 0.82, ...], [0.78, 0.81, ...])    # a - b per seed, and its CI

With 5 seeds the 95% interval is mean ± 2.776 · std / √5 (t with 4 degrees of freedom), not
± 1.96 · std / √5: a normal quantile would claim more certainty than 5 runs give. The t
quantile is computed here (bisection on the t CDF, integrated numerically in float64) because
the project does not depend on scipy. Pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache


def _t_pdf(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom (composite Simpson on [0, |x|])."""
    if x == 0:
        return 0.5
    a, h = abs(x), abs(x) / intervals
    total = _t_pdf(0.0, df) + _t_pdf(a, df)
    for i in range(1, intervals):
        total += (4 if i % 2 else 2) * _t_pdf(i * h, df)
    half = total * h / 3
    return 0.5 + half if x > 0 else 0.5 - half


@cache
def t_quantile(p: float, df: int) -> float:
    """The x with P(T <= x) = p, p in (0.5, 1), to ~1e-9."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1; got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one value
    ci_low: float  # the two-sided `level` interval for the mean (Student t, n - 1 df)
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def describe(values: Sequence[float], level: float = 0.95) -> Summary:
    """Mean, sample std and the t confidence interval of the mean (nan-wide for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("describe needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, 0.0, -math.inf, math.inf)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Summary:
    """The per-seed differences a[i] - b[i] (same seed, same i), summarised: when the interval
    excludes 0, a and b differ at that level on this set of seeds."""
    if len(a) != len(b):
        raise ValueError(f"paired needs one value per seed on both sides; got {len(a)}, {len(b)}")
    return describe([x - y for x, y in zip(a, b, strict=True)], level)
