"""What building each worker costs, with and without the garbage collector paused while it is
built (eopd_ray.startup_heap), as a table.

    python jobs/bench/startup.py [--models tiny bench] [--repeats 3] [--out FILE]

Each build runs in a fresh Python process, as a Ray actor's does, with the role's module already
imported (Ray imports it before building the actor): the rollout worker (`RolloutWorker`: vLLM's
import and engine, in-process), the teacher worker (`TeacherWorker`: transformers and the
teacher) and one learner (`LearnerWorker.setup`, a world of one: DeepSpeed's import and
engine). "plain" builds with the undecorated methods and no heap freeze; "paused" as the workers
build. CPU seconds are the process's (user + system) over the build: what a pipeline start
costs the machine, not only its wall clock. Modes alternate, medians of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from eopd_ray.env import set_job_environment  # noqa: E402

set_job_environment()

ROLES = ("rollout", "teacher", "learner")


def model_pair(models: str) -> tuple[Path, Path]:
    from eopd_ray.toy.models import ensure_bench_models, ensure_tiny_models

    if models == "bench":
        return ensure_bench_models(REPO / "runs" / "bench" / "models")
    root = REPO / "runs" / "tiny" / "models"
    return ensure_tiny_models(root / "student", root / "teacher")


def build_child(role: str, mode: str, student: str, teacher: str) -> None:
    """In the child: build `role` once and print {"cpu_s", "wall_s"} as JSON."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, as in Ray
    import eopd_ray.startup_heap as startup_heap
    from eopd_ray.config import load_config
    from eopd_ray.ports import free_port
    from eopd_ray.roles.learner import LearnerWorker
    from eopd_ray.roles.rollout import RolloutWorker
    from eopd_ray.roles.teacher import TeacherWorker

    overrides = [f"model.student_path={student}", f"model.teacher_path={teacher}"]
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", overrides)
    if mode == "plain":
        startup_heap.freeze_heap = lambda: None  # VllmEngine's freeze before vLLM loads
    plain = mode == "plain"
    cpu, wall = time.process_time(), time.perf_counter()
    if role == "rollout":
        init = RolloutWorker.__init__.__wrapped__ if plain else RolloutWorker.__init__
        init(RolloutWorker.__new__(RolloutWorker), cfg, 0)
    elif role == "teacher":
        init = TeacherWorker.__init__.__wrapped__ if plain else TeacherWorker.__init__
        init(TeacherWorker.__new__(TeacherWorker), cfg, 0)
    else:
        worker = LearnerWorker(cfg, 0, 1)
        setup = LearnerWorker.setup.__wrapped__ if plain else LearnerWorker.setup
        setup(worker, "127.0.0.1", free_port(host="127.0.0.1"))
    cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
    print(json.dumps({"cpu_s": cpu_s, "wall_s": wall_s}), flush=True)


def measure(role: str, mode: str, pair: tuple[Path, Path]) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", role, mode, str(pair[0]), str(pair[1])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"building {role} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("tiny", "bench"), default=["tiny"])
    parser.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON (a path or a URI)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        build_child(*args.child)
        return 0

    rows = []
    header = f"{'models':7} {'role':8} {'plain cpu s':>11} {'paused cpu s':>12} {'saved':>6}"
    header += f" {'plain wall s':>12} {'paused wall s':>13}"
    print(header)
    for models in args.models:
        pair = model_pair(models)
        for role in args.roles:
            runs: dict[str, list[dict[str, float]]] = {"plain": [], "paused": []}
            for _ in range(args.repeats):
                for mode in runs:
                    runs[mode].append(measure(role, mode, pair))

            def median(mode: str, key: str) -> float:
                return statistics.median(r[key] for r in runs[mode])  # noqa: B023

            row = {"models": models, "role": role}
            for mode in runs:
                row[f"{mode}_cpu_s"] = median(mode, "cpu_s")
                row[f"{mode}_wall_s"] = median(mode, "wall_s")
            row["cpu_saved"] = 1 - row["paused_cpu_s"] / row["plain_cpu_s"]
            rows.append(row)
            print(
                f"{models:7} {role:8} {row['plain_cpu_s']:11.2f} {row['paused_cpu_s']:12.2f}"
                f" {row['cpu_saved']:6.0%} {row['plain_wall_s']:12.2f} {row['paused_wall_s']:13.2f}"
            )
    if args.out:
        from eopd_ray.storage.outputs import write_json_output

        where = write_json_output(args.out, {"repeats": args.repeats, "rows": rows})
        print(f"wrote {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
