"""Turn a run's metrics.jsonl into PNG training curves.

    python jobs/plot_metrics.py runs/tiny/metrics.jsonl [--out runs/tiny/plots]

Writes one PNG per metric area (loss, kl, gate, fkl, student, topk, opd, time, roles, ...), each
with a panel per metric against the step, `overview.png` with the method's headline curves, and
`timeline.png` from the run's `timeline.json` (the latest step: one bar per worker, coloured by
stage: which role holds the step).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from eopd_ray.evaluation.plots import plot_run, plot_timeline
    from eopd_ray.telemetry.step_metrics import read_jsonl
    from eopd_ray.telemetry.timeline import Timeline

    parser = argparse.ArgumentParser(description="metrics.jsonl -> PNG curves")
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, help="default: <run dir>/plots")
    args = parser.parse_args(argv)
    rows = read_jsonl(args.metrics)
    if not rows:
        print(f"error: {args.metrics} has no rows", file=sys.stderr)
        return 2
    out = args.out or args.metrics.parent / "plots"
    for path in plot_run(rows, out):
        print(path)
    timeline = args.metrics.parent / "timeline.json"
    if timeline.exists():
        print(plot_timeline(Timeline.from_json(timeline.read_text()), out / "timeline.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
