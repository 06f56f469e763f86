"""PNG training curves from metrics rows (matplotlib, headless).

    plot_run(rows, Path("runs/toy/eopd/plots"))               # one PNG per metric area + overview
    plot_methods({"opd": [rows, ...], "eopd": [...]}, keys, path)  # mean +- band over seeds
    plot_timeline(Timeline.from_json(text), path)            # one step, one bar per worker

Metrics logged only at some steps (the held-out `eval/*`, every eval.every_steps) are drawn at
the steps that have them. The x axis counts steps done (a row's step + 1), so a value measured
before training (`start`) sits at 0.

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
            points = [(r["step"] + 1, r[key]) for r in rows if key in r]
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None)
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


def mean_band(
    seed_rows: Sequence[list[dict]], key: str, start: float | None = None, band: str = "std"
):
    """(steps done, mean over seeds, band half-width) of `key` at the steps every seed logged it;
    `start` (the value before training, the same for every seed) is put at step 0. band: "std"
    (sample std) or "ci" (half-width of the 95% t interval of the mean)."""
    import numpy as np

    from eopd_ray.evaluation.seed_stats import t_quantile

    per_seed = [{r["step"] + 1: r[key] for r in rows if key in r} for rows in seed_rows]
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    values = np.array([[d[x] for x in steps] for d in per_seed], dtype=np.float64)
    if start is not None:
        steps = [0, *steps]
        values = np.concatenate([np.full((len(per_seed), 1), start), values], 1)
    n = len(per_seed)
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if n > 1 else np.zeros_like(mean)
    scale = t_quantile(0.975, n - 1) / np.sqrt(n) if band == "ci" and n > 1 else 1.0
    return steps, mean, std * scale


def plot_methods(
    runs: dict[str, Sequence[list[dict]]],
    keys: Sequence[str],
    path: Path,
    start: dict[str, float] | None = None,
    band: str = "std",
) -> Path:
    """One panel per metric: each method's curve, the mean over its runs (seeds) at the steps
    every run logged, with a band of +-1 std (`band="std"`) or the 95% confidence interval of
    the mean (`band="ci"`, Student t). `start[key]`: the value before training, drawn at 0."""
    plt = _pyplot()
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for method, seed_rows in runs.items():
            steps, mean, half = mean_band(seed_rows, key, (start or {}).get(key), band)
            if not steps:
                continue
            ax.plot(steps, mean, label=method, marker="." if len(steps) < 50 else None)
            ax.fill_between(steps, mean - half, mean + half, alpha=0.2)
        ax.set_title(key)
        ax.set_xlabel("steps done")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


STAGE_COLOURS = {
    "generate": "tab:blue",
    "score": "tab:orange",
    "pi_old": "tab:olive",
    "train": "tab:green",
    "sync": "tab:purple",
}


def plot_timeline(timeline, path: Path) -> Path:
    """One step's timeline (eopd_ray.telemetry.timeline.Timeline): one bar per worker, coloured
    by stage, seconds from the step's start; the role that holds the step is the one whose bar
    is never empty."""
    plt = _pyplot()
    workers = sorted({w for w, *_ in timeline.intervals}, key=_worker_order)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(workers) + 1.4))
    for y, worker in enumerate(workers):
        for w, stage, start, end in timeline.intervals:
            if w == worker:
                ax.barh(
                    y,
                    end - start,
                    left=start - timeline.started,
                    color=STAGE_COLOURS.get(stage, "tab:gray"),
                    edgecolor="white",
                    linewidth=0.3,
                )
    ax.set_yticks(range(len(workers)), workers)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the step's start")
    ax.set_title(f"step {timeline.step} ({timeline.mode})")
    used = {stage for _, stage, *_ in timeline.intervals}
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=colour)
        for stage, colour in STAGE_COLOURS.items()
        if stage in used
    ]
    ax.legend(handles, [s for s in STAGE_COLOURS if s in used], loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _worker_order(worker: str) -> tuple[int, int]:
    role, _, rank = worker.rpartition("-")
    order = {"rollout": 0, "teacher": 1, "learner": 2}
    return order.get(role, 3), int(rank) if rank.isdigit() else 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
