"""Prepare the toy task's models and prompt files (cached; a second call returns at once).

    python jobs/prepare_toy.py [--root runs/toy/prepared] [--teacher-steps 2000] [--seed 0]

Trains a toy teacher (~1.1M parameters) on the task's generator to >= 90% held-out accuracy and
warms up a smaller student (~0.16M), then evaluates both on the held-out prompts. Everything
lands in <root>/<settings hash>/, and <root>/current points at it (jobs/configs/toy.yaml reads
the models and prompts from there). About 2 minutes on 2 cores.
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

from eopd_ray.toy.prepare import ToySettings, load_baseline, prepare_toy  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = ToySettings()
    parser = argparse.ArgumentParser(description="Prepare the toy teacher, student and prompts.")
    parser.add_argument("--root", default="runs/toy/prepared", help="cache directory")
    parser.add_argument("--teacher-steps", type=int, default=defaults.teacher_steps)
    parser.add_argument("--student-steps", type=int, default=defaults.student_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="model init and data")
    parser.add_argument("--task-seed", type=int, default=defaults.task.seed, help="the graph")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args(argv)
    if min(args.teacher_steps, args.student_steps) < 1:
        parser.error("--teacher-steps and --student-steps must be at least 1")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # one process: use every core
    settings = dataclasses.replace(
        defaults,
        task=dataclasses.replace(defaults.task, seed=args.task_seed),
        teacher_steps=args.teacher_steps,
        student_steps=args.student_steps,
        seed=args.seed,
    )
    started = time.monotonic()
    target = Path(args.root) / settings.key()
    if (target / "settings.json").exists():
        print(f"toy models: cached in {target}")
    else:
        print(f"toy models: preparing {target} (task: {settings.task})")
    prepared = prepare_toy(args.root, settings)
    baseline = load_baseline(prepared)
    for role in ("teacher", "student"):
        m = baseline[role]
        print(
            f"  {role:8s} held-out avg@8 {m['avg@8']:.3f}  pass@8 {m['pass@8']:.3f}  "
            f"distinct correct {m['distinct_correct']:.2f}  entropy {m['student/entropy_mean']:.3f}"
        )
    print(f"toy models ready in {time.monotonic() - started:.0f} s: {prepared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
