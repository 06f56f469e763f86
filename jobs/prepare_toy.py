"""Prepare a toy task's models and prompt files (cached; a second call returns at once).

    python jobs/prepare_toy.py [--task graph|chain] [--root DIR] [--teacher-steps N] [--seed 0]

Trains a toy teacher (~1.1M parameters) on the task's generator to >= 90% held-out accuracy and
warms up a smaller student (~0.16M), then evaluates both on the held-out prompts. Everything
lands in <root>/<settings hash>/, and <root>/current points at it (the task's config reads the
models and prompts from there). Two tasks:

- graph (default): shortest paths, 3-6 token answers; root runs/toy/prepared, read by
  jobs/configs/toy.yaml. About 2 minutes on 2 cores.
- chain: codeword chains, 21-37 token answers whose tokens are mostly forced; root
  runs/toy_chain/prepared, read by jobs/configs/toy_chain.yaml. About 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eopd_ray.env import set_job_environment

set_job_environment()

import torch  # noqa: E402

from eopd_ray.errors import EopdError  # noqa: E402
from eopd_ray.storage.outputs import local_output_dir  # noqa: E402
from eopd_ray.toy.prepare import TASKS, default_settings, load_baseline, prepare_toy  # noqa: E402

DEFAULT_ROOTS = {"graph": "runs/toy/prepared", "chain": "runs/toy_chain/prepared"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the toy teacher, student and prompts.")
    parser.add_argument("--task", choices=sorted(TASKS), default="graph", help="which toy task")
    parser.add_argument(
        "--root",
        help="cache directory (default: runs/toy/prepared for graph, "
        "runs/toy_chain/prepared for chain)",
    )
    parser.add_argument("--teacher-steps", type=int, help="default: the task's tuned value")
    parser.add_argument("--student-steps", type=int, help="default: the task's tuned value")
    parser.add_argument("--seed", type=int, help="model init and data (default 0)")
    parser.add_argument(
        "--task-seed", type=int, help="the graph, or the chain's codewords and prompts (default 0)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args(argv)
    defaults = default_settings(args.task)
    chosen = {
        "teacher_steps": args.teacher_steps,
        "student_steps": args.student_steps,
        "seed": args.seed,
    }
    settings = dataclasses.replace(
        defaults, **{name: value for name, value in chosen.items() if value is not None}
    )
    if args.task_seed is not None:
        settings = dataclasses.replace(
            settings, task=dataclasses.replace(settings.task, seed=args.task_seed)
        )
    if min(settings.teacher_steps, settings.student_steps) < 1:
        parser.error("--teacher-steps and --student-steps must be at least 1")
    try:  # the models train in place: a local directory
        root = local_output_dir(args.root or DEFAULT_ROOTS[args.task], "--root", "the toy cache")
    except EopdError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # one process: use every core
    started = time.monotonic()
    target = Path(root) / settings.key()
    if (target / "settings.json").exists():
        print(f"toy models: cached in {target}")
    else:
        print(f"toy models: preparing {target} (task: {settings.task})")
    prepared = prepare_toy(root, settings)
    baseline = load_baseline(prepared)
    for role in ("teacher", "student"):
        m = baseline[role]
        print(
            f"  {role:8s} held-out avg@8 {m['avg@8']:.3f}  pass@8 {m['pass@8']:.3f}  "
            f"distinct correct {m['distinct_correct']:.2f}  entropy {m['student/entropy_mean']:.3f}"
            f"  above tau {m['student/frac_high_entropy']:.3f}"
        )
    print(f"toy models ready in {time.monotonic() - started:.0f} s: {prepared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
