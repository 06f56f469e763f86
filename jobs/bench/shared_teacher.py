"""Two jobs at once, each with its own teacher worker, against two jobs sharing one served teacher.

    python jobs/bench/shared_teacher.py [--quick] [--steps 3] [--warmup 1] [--rounds 1]
                                        [--out FILE] [section.key=value ...]

One local Ray (8 logical CPUs, its own temp dir and namespace) and one replica of the teacher
application (`serve_teacher`, started once, before the jobs) serve every measurement. Each round
runs both modes, one after the other, on the same Ray (rounds alternate the order: own, shared,
shared, own, ...):

- own: two Pipelines at once, each with its own TeacherWorker;
- shared: two Pipelines at once with `teacher.serve` naming the application (no teacher workers).

The jobs are started in the main thread (start() installs signal handlers), then each runs in a
thread: `--warmup` untimed steps, a barrier (both jobs begin timing together), `--steps` timed
steps. Per mode it reports the wall time of both jobs' timed steps (first start to last end),
student tokens trained per second per job and for both (all tokens over that wall time), the
mean time/teacher_s per step, and memory, sampled every 0.25 s with psutil through the timed
steps: the resident memory (RSS) of the teacher processes (own: the two TeacherWorker actors;
shared: the Serve replica; the Serve controller and HTTP proxy, idle here, are listed apart) and
of all of them: every worker process of both jobs, the teacher processes and, shared, the Serve
controller and proxy. RSS counts shared library pages in each process.

Configs: bench (jobs/configs/bench.yaml, its models built by ensure_bench_models under
runs/bench/models) with teacher and learner cpus_per_worker 1 so that two jobs and the replica fit;
--quick: tiny (jobs/configs/tiny.yaml) with one rollout worker and one learner per job, 1 warm-up
+ 2 timed steps, 1-2 minutes (most of it start-up). Both modes use the synchronous step
(rollout.stream: false) unless overridden.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from eopd_ray.env import set_job_environment  # noqa: E402
from eopd_ray.ports import free_port  # noqa: E402

set_job_environment()

APP = "bench-shared-teacher"
MODES = ("own", "shared")
# Two jobs and the replica within 8 logical CPUs (each job's own teacher takes what the replica
# takes: a fair comparison).
BENCH_CPUS = ["teacher.cpus_per_worker=1", "learner.cpus_per_worker=1"]
# --quick: one rollout worker and one learner per job (tiny.yaml has two of each): a shorter
# start-up.
QUICK = ["rollout.num_workers=1", "learner.num_workers=1"]
SERVE_INFRA = ("ray::ServeController", "ray::ProxyActor")


def job_config(name: str, out_dir: Path, steps: int, overrides: list[str]):
    from eopd_ray.config import load_config

    extra = [
        f"run.output_dir={out_dir}",
        f"run.steps={steps}",
        "run.export_hf=false",
        "rollout.stream=false",
    ]
    if name == "tiny":
        from eopd_ray.toy.models import ensure_tiny_models

        # Absolute paths: the application names its model by the path it was given, and a job
        # compares that with its own (absolute) teacher path.
        models = REPO / "runs/tiny/models"
        paths = [
            f"model.student_path={models / 'student'}",
            f"model.teacher_path={models / 'teacher'}",
        ]
        cfg = load_config(REPO / "jobs/configs/tiny.yaml", [*paths, *extra, *overrides])
        ensure_tiny_models(cfg.model.student_path, cfg.model.teacher_path)
        return cfg
    from eopd_ray.toy.models import ensure_bench_models

    student, teacher = ensure_bench_models(REPO / "runs/bench/models")
    paths = [f"model.student_path={student}", f"model.teacher_path={teacher}"]
    return load_config(REPO / "jobs/configs/bench.yaml", [*paths, *extra, *BENCH_CPUS, *overrides])


class MemorySampler:
    """Sums of RSS over groups of pids, sampled in a thread; keeps each group's peak and mean."""

    def __init__(self, groups: dict[str, list[int]], every_s: float = 0.25) -> None:
        import psutil

        self.procs = {name: [psutil.Process(pid) for pid in pids] for name, pids in groups.items()}
        self.samples: dict[str, list[int]] = {name: [] for name in groups}
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")

    def sample(self) -> None:
        import psutil

        for name, procs in self.procs.items():
            total = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):  # gone (a restart): nothing
                    total += p.memory_info().rss
            self.samples[name].append(total)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def summary(self) -> dict[str, dict[str, float]]:
        mib = 1 << 20
        return {
            name: {"peak_mib": max(s) / mib, "mean_mib": statistics.fmean(s) / mib}
            for name, s in self.samples.items()
        }


def serve_infra_pids() -> list[int]:
    """The Serve controller and HTTP proxy among this driver's descendants (its local Ray)."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith(SERVE_INFRA):
            pids.append(p.pid)
    return pids


def run_pair(mode: str, cfgs: list, warmup: int, steps: int, replica_pid: int) -> dict:
    """Both jobs of one mode at once: timings, tokens and memory."""
    from eopd_ray.driver.pipeline import Pipeline

    pipelines = [Pipeline(cfg) for cfg in cfgs]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(pipelines))

    def run(i: int) -> None:
        p, rows = pipelines[i], []
        try:
            for step in range(warmup):
                p.step(step)
            barrier.wait()
            started = time.monotonic()
            for step in range(warmup, warmup + steps):
                rows.append(p.step(step))
            ended = time.monotonic()
            results[i] = {"started": started, "ended": ended, "rows": rows}
        except BaseException as exc:  # re-raised in the main thread
            barrier.abort()
            errors.append(exc)

    try:
        started = time.monotonic()
        for p in pipelines:  # start() installs signal handlers: in the main thread
            p.start()
        startup_s = time.monotonic() - started
        if mode == "own":
            teachers = [i.pid for p in pipelines for i in p.teacher.identities]
        else:
            assert all(p.teacher is None for p in pipelines)
            teachers = [replica_pid]
        workers = [
            i.pid
            for p in pipelines
            for g in (p.rollout, p.teacher, p.learner)
            if g
            for i in g.identities
        ]
        infra = serve_infra_pids() if mode == "shared" else []
        groups = {"teacher": teachers, "all": sorted(set(workers + teachers + infra))}
        if infra:
            groups["serve_infra"] = infra
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pipelines))]
        with MemorySampler(groups) as memory:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
    finally:
        for p in pipelines:
            p.shutdown()
    wall = max(r["ended"] for r in results.values()) - min(r["started"] for r in results.values())
    jobs = []
    for i in range(len(pipelines)):
        r = results[i]
        tokens = sum(m["tokens/trained"] for m in r["rows"])
        jobs.append(
            {
                "wall_s": r["ended"] - r["started"],
                "tokens": tokens,
                "tokens_per_s": tokens / (r["ended"] - r["started"]),
                "step_s": [m["time/step_s"] for m in r["rows"]],
                "teacher_s_mean": statistics.fmean(m["time/teacher_s"] for m in r["rows"]),
            }
        )
    return {
        "mode": mode,
        "startup_s": startup_s,
        "wall_s": wall,
        "tokens_per_s_total": sum(j["tokens"] for j in jobs) / wall,
        "jobs": jobs,
        "teacher_processes": len(teachers),
        "memory": memory.summary(),
    }


def print_table(rows: list[dict]) -> None:
    print(
        "\n| mode | round | both jobs' wall s | tok/s job 1 / job 2 | tok/s both | teacher s/step "
        "(mean) | teacher RSS peak MiB (processes) | all RSS peak MiB | start-up s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        jobs, mem = r["jobs"], r["memory"]
        teacher_s = statistics.fmean(j["teacher_s_mean"] for j in jobs)
        infra = (
            f" (+ {mem['serve_infra']['peak_mib']:,.0f} Serve controller/proxy)"
            if "serve_infra" in mem
            else ""
        )
        print(
            f"| {r['mode']} | {r['round']} | {r['wall_s']:.1f} | "
            f"{jobs[0]['tokens_per_s']:.0f} / {jobs[1]['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s_total']:.0f} | {teacher_s:.2f} | "
            f"{mem['teacher']['peak_mib']:,.0f} ({r['teacher_processes']}){infra} | "
            f"{mem['all']['peak_mib']:,.0f} | {r['startup_s']:.1f} |"
        )


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray import serve

    from eopd_ray.driver.actors import WORKER_ENV
    from eopd_ray.serving.app import ServeSettings, serve_teacher

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, 1 + 2 steps")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="own + shared pairs, alternated")
    parser.add_argument("--num-cpus", type=int, default=8, help="Ray's logical CPUs")
    parser.add_argument("--out", help="write the results as JSON (a path or a URI)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every job")
    args = parser.parse_args(argv)
    name = "bench"
    if args.quick:
        name, args.steps, args.warmup = "tiny", 2, 1
        args.overrides = [*QUICK, *args.overrides]
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's unix sockets live there
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        namespace="eopd-bench-shared-teacher",
        include_dashboard=False,
        log_to_driver=False,  # the workers' and Serve's logs stay in the temp dir
        _temp_dir=temp,
        runtime_env={"env_vars": WORKER_ENV},
    )
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="eopd-bench-") as tmp:
            total = args.warmup + args.steps

            def cfgs(mode: str, round_: int) -> list:
                extra = [f"teacher.serve={APP}"] if mode == "shared" else []
                return [
                    job_config(
                        name, Path(tmp) / f"{mode}{round_}-job{i}", total, [*args.overrides, *extra]
                    )
                    for i in range(2)
                ]

            teacher_cfg = job_config(name, Path(tmp) / "served", total, args.overrides)
            started = time.monotonic()
            settings = ServeSettings(name=APP, route_prefix="/bench-shared", http_port=free_port())
            handle = serve_teacher(settings, teacher_cfg)
            replica_pid = handle.pid.remote().result()
            serve_start_s = time.monotonic() - started
            print(
                f"{name}: teacher application up in {serve_start_s:.1f} s "
                f"(replica pid {replica_pid})"
            )
            for round_ in range(args.rounds):
                order = MODES if round_ % 2 == 0 else MODES[::-1]
                for mode in order:
                    print(
                        f"{name} round {round_} {mode}: 2 jobs x ({args.warmup} warm-up + "
                        f"{args.steps} timed steps) ...",
                        flush=True,
                    )
                    row = run_pair(mode, cfgs(mode, round_), args.warmup, args.steps, replica_pid)
                    row["round"] = round_
                    rows.append(row)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    print_table(rows)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    if args.out:
        from eopd_ray.storage.outputs import write_json_output

        summary = {
            "config": name,
            "steps": args.steps,
            "warmup": args.warmup,
            "num_cpus": args.num_cpus,
            "cores": len(os.sched_getaffinity(0)),
            "serve_start_s": serve_start_s,
            "loadavg_end": load,
            "overrides": args.overrides,
            "rows": rows,
        }
        where = write_json_output(args.out, summary)
        print(f"results: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
