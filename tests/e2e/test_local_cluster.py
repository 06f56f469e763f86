"""docs/running.md's local-cluster recipe, command for command, from a clean clone.

`cluster/local-head.sh up` (token auth on), `eval "$(cluster/local-head.sh env)"`, then
`ray job submit --working-dir . -- python jobs/distill.py --config ...` for toy.yaml and
tiny.yaml, `ray job stop`, resubmission, `cluster/local-head.sh down`. The only changes to the
documented commands: fewer `run.steps`, free ports, and a temporary HOME (so the token, the head's
state and the durable outputs under ~/eopd-ray are this test's own). The toy models are found
where a first job would have prepared them (~/eopd-ray/runs/toy/prepared/current): preparing
them takes minutes, and tests/e2e/test_toy.py and tests/toy/ test the preparation itself.

The same head serves the monitoring checks: while a tiny job runs, its metrics are read raw from
the head's metrics port and through a real Prometheus server scraping it (PromQL by run), and
the actors are listed with ray.util.state; a stop during start-up goes through the Python
JobSubmissionClient (docs/running.md's "From Python").
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest

from eopd_ray.ports import free_ports
from eopd_ray.telemetry.step_metrics import read_jsonl

from .conftest import REPO, short_tmpdir
from .prometheus import INSTALL_HINT, Prometheus, find_prometheus

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def clean_clone(dest: Path) -> Path:
    """What `git clone` of the working tree gives: tracked and not-ignored files (no .venv,
    no runs/)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def head_up(clone: Path, base: dict[str, str]) -> subprocess.CompletedProcess:
    """`cluster/local-head.sh up` (what `make cluster-up` runs) in `clone`."""
    return subprocess.run(
        ["bash", "cluster/local-head.sh", "up"],
        cwd=clone,
        env=base,
        capture_output=True,
        text=True,
        timeout=240,
    )


def head_env(clone: Path, base: dict[str, str]) -> dict[str, str]:
    """The environment after `eval "$(cluster/local-head.sh env)"`."""
    exported = subprocess.run(
        ["bash", "-c", 'eval "$(cluster/local-head.sh env)" && env -0'],
        cwd=clone,
        env=base,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return dict(line.decode().split("=", 1) for line in exported if b"=" in line)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, toy_prepared):
    """(environment after `eval "$(cluster/local-head.sh env)"`, the clone, HOME)."""
    clone = clean_clone(tmp_path_factory.mktemp("clone"))
    home = Path(short_tmpdir("home"))
    prepared = home / "eopd-ray" / "runs" / "toy" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "current").symlink_to(toy_prepared)
    dash, gcs, metrics, client, agent, agent_grpc, runtime_env = free_ports(7)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "EOPD_RAY"))}
    base.update(
        HOME=str(home),
        VENV_BIN=str(BIN),
        DASHBOARD_PORT=str(dash),
        GCS_PORT=str(gcs),
        METRICS_PORT=str(metrics),
        RAY_TEMP_DIR=short_tmpdir("lh"),
        DASHBOARD_AGENT_PORT=str(agent),
        RAY_START_ARGS=(
            f"--ray-client-server-port={client} --dashboard-agent-grpc-port={agent_grpc} "
            f"--runtime-env-agent-port={runtime_env}"
        ),
    )
    up = head_up(clone, base)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        env = head_env(clone, base)
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]
        assert env["PATH"].startswith(str(BIN))
        env["METRICS_PORT"] = str(metrics)
        yield env, clone, home
    finally:
        subprocess.run(["bash", "cluster/local-head.sh", "down"], cwd=clone, env=base, timeout=90)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(base["RAY_TEMP_DIR"], ignore_errors=True)


def ray(env, clone, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ray", *args], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
    )


def submit(env, clone, *entrypoint_args: str, wait: bool = True, job_id: str | None = None):
    flags = [] if wait else ["--no-wait"]
    flags += ["--submission-id", job_id] if job_id else []
    return ray(
        env,
        clone,
        "job",
        "submit",
        *flags,
        "--working-dir",
        ".",
        "--",
        "python",
        "jobs/distill.py",
        *entrypoint_args,
    )


def job_logs(env, clone, job_id: str) -> str:
    return ray(env, clone, "job", "logs", job_id).stdout


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def test_toy_job_from_a_clean_clone_writes_where_it_says(cluster):
    env, clone, home = cluster
    proc = submit(env, clone, "--config", "jobs/configs/toy.yaml", "run.steps=3")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in log, log[-4000:]
    where = Path(re.search(r"outputs in (\S+)", log).group(1))
    # A relative run.output_dir in a job lands under ~/eopd-ray, not in Ray's temporary copy.
    assert where == home / "eopd-ray" / "runs" / "toy" / "eopd"
    assert [r["step"] for r in read_jsonl(where / "metrics.jsonl")] == [0, 1, 2]
    assert (where / "hf" / "config.json").exists()
    assert (where / "checkpoints" / "step-000002" / "state.json").exists()
    assert not (clone / "runs").exists()
    # Without a terminal the driver logs one progress line now and then, never a bar.
    assert re.search(r"step 2 done \(3/3, 100%\) \| loss [\d.]+ \| reverse KL", log), log[-3000:]
    assert "\r" not in log


# What a user asks Prometheus: one run's loss, and the loss per run whatever other tags (worker,
# session, node) a series carries.
QUERIES = ('ray_eopd_loss_total{run="tiny"}', "sum by (run) (ray_eopd_loss_total)")


@dataclass
class RunningJob:
    """Job A of the stop/resume sequence, observed while it runs."""

    out: Path
    run_id: str
    actors: list[tuple[str, str]]  # (name, repr) of the live actors
    scraped: str  # the head's /metrics text once every wanted metric was there ("" if never)
    last_scrape: str
    answers: dict[str, list[dict]] | None  # PromQL -> first non-empty result; None: no binary


@pytest.fixture(scope="module")
def job_a(cluster) -> RunningJob:
    """tiny.yaml submitted and left running (run.resume=never, the config's own) while its
    metrics are read raw and, when the binary is here, through a real Prometheus asked during the
    run (a finished run's series goes stale). test_stop_resume_... stops it."""
    env, clone, home = cluster
    out = home / "eopd-ray" / "runs" / "tiny"
    port = int(env["METRICS_PORT"])
    binary = find_prometheus()
    server = Prometheus(binary, target=f"127.0.0.1:{port}") if binary else nullcontext()
    with server as prom:
        submit(
            env,
            clone,
            "--config",
            "jobs/configs/tiny.yaml",
            "run.steps=200",
            "data.toy_prompts=2048",
            wait=False,
            job_id="tiny-a",
        )
        wait_for(lambda: len(rows(out / "metrics.jsonl")) >= 3, 300, "3 steps of job A")
        run_id = run_id_of(out)
        actors = actor_table(env, clone)
        wanted = [*WANTED, f'run_id="{run_id}"']
        scraped, last, answers = "", "", {}
        deadline = time.time() + 90  # gauges reach the endpoint ~15 s after they are set
        while time.time() < deadline:
            last = scrape(port)
            if all(w in last for w in wanted):
                scraped = last
            for q in QUERIES:
                if prom and q not in answers and (result := prom.query(q)):
                    answers[q] = result
            if scraped and (prom is None or len(answers) == len(QUERIES)):
                break
            time.sleep(2)
    return RunningJob(out, run_id, actors, scraped, last, answers if prom else None)


WANTED = [
    "ray_eopd_loss_total{",
    'run="tiny"',
    "ray_eopd_gate_frac",
    "ray_eopd_time_sync_s",
    "ray_eopd_worker_rollout_tokens_per_s{",
    'role="learner"',
    'rank="1"',
]


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def test_driver_and_worker_metrics_reach_the_heads_metrics_port(job_a):
    """Every step metric and the workers' own gauges, tagged with the run's name and id."""
    missing = [w for w in [*WANTED, f'run_id="{job_a.run_id}"'] if w not in job_a.scraped]
    eopd = [line for line in job_a.last_scrape.splitlines() if "eopd" in line][:20]
    assert not missing, (missing, eopd)


def test_a_real_prometheus_answers_promql_by_run(job_a):
    if job_a.answers is None:
        pytest.skip(INSTALL_HINT)
    missing = [q for q in QUERIES if q not in job_a.answers]
    assert not missing, (missing, job_a.answers)
    for q, result in job_a.answers.items():
        assert {series["metric"].get("run") for series in result} == {"tiny"}, (q, result)
        for series in result:
            assert math.isfinite(float(series["value"][1])), (q, series)


def test_actors_are_named_by_run_role_and_rank(job_a):
    run = job_a.run_id
    names = sorted(name for name, _ in job_a.actors if name.startswith(f"{run}/"))
    expected = [("learner", 0), ("learner", 1), ("rollout", 0), ("rollout", 1), ("teacher", 0)]
    assert names == [f"{run}/{role}-{rank}" for role, rank in expected], job_a.actors
    reprs = dict(job_a.actors)
    assert reprs[f"{run}/rollout-1"] == f"rollout-1 weights v0 [{run}]"
    assert reprs[f"{run}/learner-0"] == f"learner-0 trained 0 steps [{run}]"


def test_stop_resume_never_mixes_runs(cluster, job_a):
    """The sequence that once mixed two runs' histories: A (run.resume=never, the tiny.yaml
    default) is stopped after a few steps; B, the same command, starts afresh and finishes 2
    steps; C with run.resume=auto continues B, not A, and every step is there exactly once."""
    env, clone, _ = cluster
    out, run_a = job_a.out, job_a.run_id
    tiny = ("--config", "jobs/configs/tiny.yaml")
    assert ray(env, clone, "job", "stop", "tiny-a").returncode == 0
    wait_for(lambda: "stopped after step" in job_logs(env, clone, "tiny-a"), 60, "A's stop")
    log_a = job_logs(env, clone, "tiny-a")
    stopped_at = int(re.search(r"stopped after step (\d+)", log_a).group(1))
    assert "run.resume=never: the same command starts a new run" in log_a, log_a[-2000:]
    assert f"add run.resume=auto to resume it at step {stopped_at + 1}" in log_a
    assert stopped_at >= 2

    b = submit(env, clone, *tiny, "run.steps=2")
    assert b.returncode == 0, (b.stdout + b.stderr)[-3000:]
    run_b = run_id_of(out)
    assert run_b != run_a
    moved = out / "previous" / run_a
    assert [r["step"] for r in read_jsonl(moved / "metrics.jsonl")][-1] == stopped_at
    assert (moved / "checkpoints" / f"step-{stopped_at:06d}").is_dir()

    c = submit(env, clone, *tiny, "run.steps=4", "run.resume=auto")
    log_c = c.stdout + c.stderr
    assert c.returncode == 0, log_c[-3000:]
    assert "checkpoints/step-000001: next step 2" in log_c, log_c[-3000:]
    assert run_id_of(out) == run_b
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3]


def test_a_stop_during_start_up_ends_cleanly(cluster):
    """Through the Python JobSubmissionClient (docs/running.md), in a child process that has
    the recipe's environment (token included)."""
    env, clone, _ = cluster
    code = (
        "import sys, time\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "client = JobSubmissionClient()  # RAY_ADDRESS and the token from the environment\n"
        "job = client.submit_job(\n"
        "    entrypoint='python jobs/distill.py --config jobs/configs/tiny.yaml',\n"
        "    runtime_env={'working_dir': '.'},\n"
        ")\n"
        "deadline = time.time() + 120\n"
        "while 'eopd_ray.driver.pipeline: run ' not in client.get_job_logs(job):\n"
        "    assert time.time() < deadline, client.get_job_logs(job)[-3000:]\n"
        "    time.sleep(0.5)\n"
        "client.stop_job(job)\n"
        "while 'stopped during start-up' not in client.get_job_logs(job):\n"
        "    assert time.time() < deadline + 30, client.get_job_logs(job)[-3000:]\n"
        "    time.sleep(0.5)\n"
        "print(client.get_job_logs(job))\n"
    )
    proc = subprocess.run(
        [str(BIN / "python"), "-c", code],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "stopped during start-up (SIGTERM)" in proc.stdout
    assert "Traceback" not in proc.stdout


def run_id_of(out: Path) -> str:
    text = (out / "config.yaml").read_text()
    return re.search(r"^  id: (\S+)$", text, re.M).group(1)


def actor_table(env, clone) -> list[tuple[str, str]]:
    """(name, repr) of the cluster's live actors, through ray.util.state.list_actors."""
    code = (
        "import json\n"
        "from ray.util.state import list_actors\n"
        "actors = list_actors(filters=[('state', '=', 'ALIVE')], detail=True)\n"
        "print(json.dumps([[a.name, a.repr_name] for a in actors]))\n"
    )
    proc = subprocess.run(
        [str(BIN / "python"), "-c", code], cwd=clone, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(a) for a in json.loads(proc.stdout.strip().splitlines()[-1])]
