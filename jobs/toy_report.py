"""Evaluate a finished toy run on the held-out prompts and write its report.

    python jobs/toy_report.py --config jobs/configs/toy.yaml [section.key=value ...]

Reads the run's exported student (<run.output_dir>/hf), the prepared teacher and the student's
starting point (jobs/prepare_toy.py), samples 8 answers per held-out prompt from each, and prints
accuracy, diversity and entropy side by side. Writes <run.output_dir>/report.md, eval.json and
PNG curves in <run.output_dir>/plots; a run.output_dir URI (s3://...) is read from and written
to in place (the exported student is downloaded, the report drawn locally and uploaded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eopd_ray.env import set_job_environment

set_job_environment()

from eopd_ray.config import load_config  # noqa: E402
from eopd_ray.driver.locations import resolve_locations  # noqa: E402
from eopd_ray.errors import EopdError  # noqa: E402
from eopd_ray.storage.outputs import output_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Held-out evaluation and report of a toy run.")
    parser.add_argument("--config", required=True, help="the run's config, e.g. toy.yaml")
    parser.add_argument("overrides", nargs="*", help="the run's dotted overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after flags
    try:
        cfg = resolve_locations(load_config(args.config, args.overrides))
        store = output_dir(cfg.run.output_dir, "run.output_dir")
        if not store.exists("hf/config.json"):
            print(
                f"error: no exported student in {store.show('hf')}; run jobs/distill.py with "
                "this config first (and run.export_hf=true)",
                file=sys.stderr,
            )
            return 2
        exported = store.fetch("hf")  # the directory itself, or a downloaded copy
    except EopdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from eopd_ray.evaluation.plots import plot_run, plot_timeline
    from eopd_ray.toy.evaluate import evaluate_toy
    from eopd_ray.toy.prepare import load_baseline, load_settings, read_prompts
    from eopd_ray.toy.report import comparison_table, write_report

    torch.set_num_threads(os.cpu_count() or 1)
    prepared = Path(cfg.data.train_path).parent
    settings = load_settings(prepared)
    baseline = load_baseline(prepared)
    after = evaluate_toy(
        exported,
        settings.task,
        read_prompts(prepared / "eval.jsonl"),
        teacher_dir=cfg.model.teacher_path,
        samples=settings.eval_samples,
        tau=cfg.loss.entropy_threshold,
    )
    run_dir = store.staging("")  # the run directory itself, or a scratch one to upload
    (run_dir / "eval.json").write_text(json.dumps(after, indent=2))
    columns = {
        "teacher": baseline["teacher"],
        "student before": baseline["student"],
        f"student after {cfg.loss.name}": after,
    }
    lines = store.read_text("metrics.jsonl").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    plots = plot_run(rows, run_dir / "plots")
    if store.exists("timeline.json"):  # the last step: which role holds a step
        from eopd_ray.telemetry.timeline import Timeline

        timeline = Timeline.from_json(store.read_text("timeline.json"))
        plots.append(plot_timeline(timeline, run_dir / "plots" / "timeline.png"))
    command = " ".join(["python jobs/distill.py --config", args.config, *args.overrides])
    shown = [p for p in plots if p.stem in ("overview", "eval", "timeline")]  # all in plots/
    write_report(run_dir, columns, rows, command, shown)
    store.publish(run_dir, "")
    print(f"\nheld-out prompts ({int(after['prompts'])}), 8 samples each:\n")
    print(comparison_table(columns))
    print(f"\nreport: {store.show('report.md')}  (curves in {store.show('plots')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
