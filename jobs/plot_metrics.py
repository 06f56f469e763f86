"""Turn a run's metrics.jsonl into PNG training curves.

    python jobs/plot_metrics.py runs/tiny/metrics.jsonl [--out runs/tiny/plots]
    python jobs/plot_metrics.py s3://bucket/runs/tiny/metrics.jsonl   # plots to .../tiny/plots

Writes one PNG per metric area (loss, kl, gate, fkl, student, topk, opd, time, roles, ...), each
with a panel per metric against the step, `overview.png` with the method's headline curves, and
`timeline.png` from the run's `timeline.json` (the latest step: one bar per worker, coloured by
stage: which role holds the step). Both the metrics file and `--out` may be URIs (any
pyarrow.fs URI): the PNGs are drawn locally and uploaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from eopd_ray.errors import EopdError
    from eopd_ray.evaluation.plots import plot_run, plot_timeline
    from eopd_ray.storage.outputs import output_dir
    from eopd_ray.telemetry.timeline import Timeline

    parser = argparse.ArgumentParser(description="metrics.jsonl -> PNG curves")
    parser.add_argument("metrics", help="a run's metrics.jsonl: a path or a URI")
    parser.add_argument("--out", help="a directory or a URI; default: <run dir>/plots")
    args = parser.parse_args(argv)
    try:
        base, sep, query = args.metrics.partition("?")
        run_dir, _, name = base.rpartition("/") if "/" in base else (".", "", base)
        run = output_dir(f"{run_dir}{sep}{query}", "metrics")
        text = run.read_text(name) if run.exists(name) else ""
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not rows:
            print(f"error: {run.show(name)} has no rows (or is missing)", file=sys.stderr)
            return 2
        out = output_dir(args.out, "--out") if args.out else output_dir(run.location, "metrics")
        rel = "" if args.out else "plots"
        local = out.staging(rel)  # the directory itself, or a scratch one to upload
        plots = plot_run(rows, local)
        if run.exists("timeline.json"):
            timeline = Timeline.from_json(run.read_text("timeline.json"))
            plots.append(plot_timeline(timeline, local / "timeline.png"))
        out.publish(local, rel)
    except EopdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in plots:
        print(out.show(f"{rel}/{path.name}".lstrip("/")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
