"""Curves: sparse metrics (held-out evaluations) at the steps that have them; bands over seeds."""

from __future__ import annotations

import math

import pytest

from eopd_ray.evaluation.plots import mean_band, plot_methods, plot_run


def rows_with_eval(values: dict[int, float], steps: int = 6) -> list[dict]:
    rows = [{"step": s, "kl/reverse_sampled": 1.0 / (s + 1)} for s in range(steps)]
    for step, value in values.items():
        rows[step]["eval/avg@8"] = value
    return rows


def test_mean_band_uses_the_steps_every_seed_logged_and_the_start_value():
    seeds = [rows_with_eval({1: 0.2, 3: 0.4, 5: 0.6}), rows_with_eval({1: 0.4, 3: 0.6})]
    steps, mean, half = mean_band(seeds, "eval/avg@8", start=0.1)
    assert steps == [0, 2, 4]  # steps done; step 6 only one seed has
    assert list(mean) == pytest.approx([0.1, 0.3, 0.5])
    assert list(half) == pytest.approx([0.0, math.sqrt(0.02), math.sqrt(0.02)])  # sample std
    _, _, ci = mean_band(seeds, "eval/avg@8", band="ci")
    # t(0.975, 1) = 12.706; sqrt(0.02) / sqrt(2) = 0.1
    assert list(ci) == pytest.approx([1.2706, 1.2706], abs=1e-3)


def test_plots_are_written_for_sparse_metrics(tmp_path):
    rows = rows_with_eval({2: 0.3, 5: 0.5})
    written = {p.stem for p in plot_run(rows, tmp_path / "run")}
    assert {"overview", "eval", "kl"} <= written
    path = plot_methods(
        {"eopd": [rows, rows_with_eval({2: 0.4, 5: 0.7})]},
        ["eval/avg@8", "kl/reverse_sampled"],
        tmp_path / "methods.png",
        start={"eval/avg@8": 0.1},
        band="ci",
    )
    assert path.stat().st_size > 0
