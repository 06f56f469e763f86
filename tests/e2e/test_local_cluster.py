"""docs/running.md's local-cluster recipe, command for command, from a clean clone.

`cluster/local-head.sh up` (token auth on), `eval "$(cluster/local-head.sh env)"`, then
`ray job submit --working-dir . -- python jobs/distill.py --config ...` for toy.yaml and
tiny.yaml, `ray job stop`, resubmission, `cluster/local-head.sh down`. The only changes to the
documented commands: fewer `run.steps`, free ports, and a temporary HOME (so the token, the head's
state and the durable outputs under ~/eopd-ray are this test's own). The toy models are found
where a first job would have prepared them (~/eopd-ray/runs/toy/prepared/current): preparing
them takes minutes, and tests/e2e/test_toy.py and tests/toy/ test the preparation itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eopd_ray.metrics import read_jsonl

from .conftest import REPO, short_tmpdir
from .test_job_submit import free_ports

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
        RAY_START_ARGS=(
            f"--ray-client-server-port={client} --dashboard-agent-listen-port={agent} "
            f"--dashboard-agent-grpc-port={agent_grpc} --runtime-env-agent-port={runtime_env}"
        ),
    )
    up = subprocess.run(
        ["bash", "cluster/local-head.sh", "up"],
        cwd=clone,
        env=base,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        exported = subprocess.run(
            ["bash", "-c", 'eval "$(cluster/local-head.sh env)" && env -0'],
            cwd=clone,
            env=base,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        env = dict(line.decode().split("=", 1) for line in exported if b"=" in line)
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]
        assert env["PATH"].startswith(str(BIN))
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
    assert re.search(r"step 3/3 \(100%\) \| loss [\d.]+ \| reverse KL", log), log[-3000:]
    assert "\r" not in log


def test_stop_resume_never_mixes_runs_and_actors_are_named(cluster):
    """The sequence that once mixed two runs' histories: A (run.resume=never, the tiny.yaml
    default) is stopped after a few steps; B, the same command, starts afresh and finishes 2
    steps; C with run.resume=auto continues B, not A, and every step is there exactly once."""
    env, clone, home = cluster
    out = home / "eopd-ray" / "runs" / "tiny"
    tiny = ("--config", "jobs/configs/tiny.yaml")
    submit(env, clone, *tiny, "run.steps=30", wait=False, job_id="tiny-a")
    wait_for(lambda: len(rows(out / "metrics.jsonl")) >= 3, 300, "3 steps of job A")
    actors = actor_table(env, clone)
    run_a = run_id_of(out)
    names = sorted(name for name, _ in actors if name.startswith(f"{run_a}/"))
    assert names == [
        f"{run_a}/{role}-{rank}"
        for role, rank in [
            ("learner", 0),
            ("learner", 1),
            ("rollout", 0),
            ("rollout", 1),
            ("teacher", 0),
        ]
    ], actors
    reprs = dict(actors)
    assert (
        reprs[f"{run_a}/rollout-1"].startswith("rollout-1 weights v")
        and run_a in reprs[f"{run_a}/rollout-1"]
    )
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
    env, clone, _ = cluster
    submit(env, clone, "--config", "jobs/configs/tiny.yaml", wait=False, job_id="tiny-early")
    wait_for(
        lambda: "eopd_ray.pipeline: run " in job_logs(env, clone, "tiny-early"), 120, "start-up"
    )
    assert ray(env, clone, "job", "stop", "tiny-early").returncode == 0
    wait_for(
        lambda: "stopped during start-up" in job_logs(env, clone, "tiny-early"), 30, "the stop"
    )
    assert "Traceback" not in job_logs(env, clone, "tiny-early")


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
