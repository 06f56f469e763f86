"""Turn a run's metrics.jsonl into PNG training curves.

    python jobs/plot_metrics.py runs/tiny/metrics.jsonl [--out runs/tiny/plots]

Writes one PNG per metric area (loss, kl, gate, fkl, student, topk, opd, time, ...), each with a
panel per metric against the step, and `overview.png` with the method's headline curves.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OVERVIEW = [
    "loss/total",
    "kl/reverse_sampled",
    "gate/frac",
    "fkl/on_gated",
    "student/entropy_mean",
    "student/frac_high_entropy",
]


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(argv: list[str] | None = None) -> int:
    from eopd_ray.metrics import read_jsonl

    parser = argparse.ArgumentParser(description="metrics.jsonl -> PNG curves")
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, help="default: <run dir>/plots")
    args = parser.parse_args(argv)
    rows = read_jsonl(args.metrics)
    if not rows:
        print(f"error: {args.metrics} has no rows", file=sys.stderr)
        return 2
    for path in plot(rows, args.out or args.metrics.parent / "plots"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
