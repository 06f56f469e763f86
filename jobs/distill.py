"""Distill a student from a teacher with EOPD on Ray.

    python jobs/distill.py --config jobs/configs/tiny.yaml [section.key=value ...]

Joins the Ray cluster in RAY_ADDRESS (set by `ray job submit`), else starts an embedded local
Ray on 127.0.0.1. Writes <run.output_dir>/config.yaml and metrics.jsonl.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eopd_ray.env import set_job_environment

set_job_environment()  # before anything imports Ray

from eopd_ray.config import load_config  # noqa: E402
from eopd_ray.errors import EopdError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Distill a student from a teacher with EOPD.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.name=opd")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after flags
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.model.build_tiny:
            from eopd_ray.toy.models import ensure_tiny_models

            ensure_tiny_models(cfg.model.student_path, cfg.model.teacher_path)
        if cfg.model.build_rehearsal:
            from eopd_ray.toy.rehearsal import ensure_rehearsal_for_config

            ensure_rehearsal_for_config(cfg)
        from eopd_ray.pipeline import Pipeline

        pipeline = Pipeline(cfg)
        try:
            pipeline.start()
            history = pipeline.run(progress=not args.no_progress)
        finally:
            pipeline.shutdown()
    except EopdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not history:
        print(
            f"nothing to do: the run in {cfg.run.output_dir} already finished its "
            f"{cfg.run.steps} steps (run.resume=never or another run.output_dir starts anew)"
        )
        return 0
    if pipeline.stopped_early:
        print(
            f"stopped after step {pipeline.start_step + len(history) - 1}: checkpoint written; "
            "submit the same command again to resume"
        )
        return 0
    first, last = history[0], history[-1]
    print(
        f"done: {len(history)} steps, loss {first['loss/total']:.4f} -> {last['loss/total']:.4f}, "
        f"reverse KL {first['kl/reverse_sampled']:.3f} -> {last['kl/reverse_sampled']:.3f}; "
        f"metrics in {cfg.run.output_dir}/metrics.jsonl"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
