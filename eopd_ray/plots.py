"""PNG training curves from metrics rows (matplotlib, headless).

    plot_run(rows, Path("runs/toy/eopd/plots"))               # one PNG per metric area + overview
    plot_methods({"opd": [rows, ...], "eopd": [...]}, keys, path)  # mean +- std over seeds

Pure: imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

OVERVIEW = [
    "loss/total",
    "kl/reverse_sampled",
    "gate/frac",
    "fkl/on_gated",
    "student/entropy_mean",
    "student/frac_high_entropy",
]


def plot_run(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per metric area (loss, kl, gate, ...) and `overview.png`, into `out`."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    areas: dict[str, list[str]] = defaultdict(list)
    for key in sorted({k for r in rows for k in r if k != "step"}):
        areas[key.split("/")[0]].append(key)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in [("overview", [k for k in OVERVIEW if k in rows[0]]), *areas.items()]:
        if not keys:
            continue
        cols = min(3, len(keys))
        nrows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker=".")
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def plot_methods(runs: dict[str, Sequence[list[dict]]], keys: Sequence[str], path: Path) -> Path:
    """One panel per metric: each method's curve, mean over its runs (seeds) with a +-1 std band."""
    import numpy as np

    plt = _pyplot()
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for method, seed_rows in runs.items():
            length = min(len(rows) for rows in seed_rows)
            values = np.array([[r.get(key, np.nan) for r in rows[:length]] for rows in seed_rows])
            mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            steps = np.arange(length)
            ax.plot(steps, mean, label=method)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
