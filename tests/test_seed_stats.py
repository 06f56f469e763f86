"""Seed statistics against published t quantiles and a float64 brute-force reference."""

from __future__ import annotations

import math
import random

import pytest

from eopd_ray.evaluation.seed_stats import describe, paired, t_cdf, t_quantile

# Two-sided 95% critical values of Student's t (any statistics table).
PUBLISHED_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize("df,value", sorted(PUBLISHED_T975.items()))
def test_t_quantile_matches_published_tables(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)


def test_t_cdf_matches_closed_forms():
    # df = 1 is Cauchy, df = 2 has a closed form too.
    for x in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-9)
        assert t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-9)


def test_describe_and_paired_match_a_direct_float64_computation():
    rng = random.Random(0)
    for _ in range(10):
        n = rng.randint(2, 9)
        a = [rng.gauss(0.7, 0.05) for _ in range(n)]
        b = [rng.gauss(0.7, 0.05) for _ in range(n)]
        s = describe(a)
        mean = sum(a) / n
        std = (sum((x - mean) ** 2 for x in a) / (n - 1)) ** 0.5
        half = PUBLISHED_T975.get(n - 1, t_quantile(0.975, n - 1)) * std / n**0.5
        assert (s.n, s.mean, s.std) == (n, pytest.approx(mean), pytest.approx(std))
        assert (s.ci_low, s.ci_high) == (
            pytest.approx(mean - half, abs=1e-3),
            pytest.approx(mean + half, abs=1e-3),
        )
        d = paired(a, b)
        assert d.mean == pytest.approx(mean - sum(b) / n)
        assert d.std == pytest.approx(describe([x - y for x, y in zip(a, b, strict=True)]).std)


def test_edge_cases_are_explicit():
    one = describe([0.5])
    assert (one.mean, one.std, one.ci_low, one.ci_high) == (0.5, 0.0, -math.inf, math.inf)
    with pytest.raises(ValueError):
        describe([])
    with pytest.raises(ValueError, match="one value per seed"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        t_quantile(0.4, 3)
