"""Distill a student from a teacher with EOPD on Ray.

    python jobs/distill.py --config jobs/configs/tiny.yaml [section.key=value ...]

Joins the Ray cluster in RAY_ADDRESS (set by `ray job submit`), else starts an embedded local
Ray on 127.0.0.1. Writes config.yaml, metrics.jsonl, checkpoints/ and hf/ to run.output_dir (a
path, or a URI such as s3://bucket/run) and prints where.
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
from eopd_ray.driver.locations import resolve_locations  # noqa: E402
from eopd_ray.errors import EopdError  # noqa: E402
from eopd_ray.storage.run_storage import RunStorage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Distill a student from a teacher with EOPD.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.name=opd")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: a log line every run.log_every_s instead (the default when the "
        "output is not a terminal, e.g. under `ray job logs`)",
    )
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after flags
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from eopd_ray.driver.locations import job_without_working_dir

    if warning := job_without_working_dir():  # first thing: before it runs the wrong code long
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    from eopd_ray.driver.stopping import exit_on_sigterm

    exit_on_sigterm()  # start-up, model preparation included, ends at once on SIGTERM
    pipeline = None
    try:
        cfg = resolve_locations(load_config(args.config, args.overrides))
        RunStorage(cfg.run.output_dir).check()  # a wrong endpoint fails now, not after Ray starts
        build_models(cfg)
        from eopd_ray.driver.pipeline import Pipeline

        pipeline = Pipeline(cfg)
        try:
            pipeline.start()  # logs "run <id>: outputs in <where>" first thing
            history = pipeline.run(progress="lines" if args.no_progress else "auto")
        finally:
            pipeline.shutdown()
    except EopdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = pipeline.store.uri
    if not history:
        print(
            f"nothing to do: run {pipeline.run_id} in {where} already finished its "
            f"{cfg.run.steps} steps (run.resume=never, or another run.output_dir, starts anew)"
        )
        return 0
    if pipeline.stopped_early:
        print(stop_message(pipeline, history))
        return 0
    first, last = history[0], history[-1]
    print(
        f"done: run {pipeline.run_id}, {len(history)} steps, loss {first['loss/total']:.4f} -> "
        f"{last['loss/total']:.4f}, reverse KL {first['kl/reverse_sampled']:.3f} -> "
        f"{last['kl/reverse_sampled']:.3f}; outputs in {where} (metrics.jsonl, checkpoints/"
        + (", hf/" if cfg.run.export_hf else "")
        + ")"
    )
    return 0


def build_models(cfg) -> None:
    """The models (and prompts) a config asks the job to build when they are missing."""
    if cfg.model.build_tiny:
        from eopd_ray.toy.models import ensure_tiny_models

        ensure_tiny_models(cfg.model.student_path, cfg.model.teacher_path)
    if cfg.model.build_rehearsal:
        from eopd_ray.toy.rehearsal import ensure_rehearsal_for_config

        ensure_rehearsal_for_config(cfg)
    if cfg.model.build_toy:
        from eopd_ray.toy.prepare import ensure_toy_for_config

        ensure_toy_for_config(cfg)


def stop_message(pipeline, history) -> str:
    """What a stopped run tells the user, true for each run.resume setting."""
    cfg = pipeline.cfg
    last = pipeline.start_step + len(history) - 1
    head = f"stopped after step {last}: checkpoint written in {pipeline.store.show('checkpoints')}"
    if cfg.run.resume == "auto":
        return (
            f"{head}; submit the same command again to resume run {cfg.run.id} at step {last + 1}"
        )
    return (
        f"{head}. This config has run.resume=never: the same command starts a new run (this one "
        f"moves to previous/{cfg.run.id}); add run.resume=auto to resume it at step {last + 1}"
    )


if __name__ == "__main__":
    sys.exit(main())
