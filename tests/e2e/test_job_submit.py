"""`ray job submit` of jobs/distill.py against a real `ray start --head` on this machine.

The head runs on free ports in its own temp dir and is stopped by signalling its own process
(never `ray stop`, which would kill every Ray cluster on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from eopd_ray.metrics import read_jsonl

from .conftest import REPO, short_tmpdir

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard address, environment, metrics port) of a fresh local head; SIGTERM on
    teardown."""
    bin_dir = Path(sys.executable).parent
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",  # local test cluster only; real clusters keep the token on
    )
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent, agent_grpc, runtime_env, metrics = free_ports(7)
    temp = short_tmpdir("rh")
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            "--num-cpus=4",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                head.kill()
                pytest.fail(f"ray head did not start: {head.stdout.read().decode()[-3000:]}")
            time.sleep(1)
    yield address, env, metrics
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_tiny_config(ray_head, tiny_pair, tmp_path):
    address, env, _ = ray_head
    out = tmp_path / "out"
    student, teacher = tiny_pair
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "jobs/distill.py",
        "--config",
        "jobs/configs/tiny.yaml",
        "--no-progress",
        f"model.student_path={student}",
        f"model.teacher_path={teacher}",
        "run.steps=2",
        f"run.output_dir={out}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "succeeded" in log.lower(), log
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def test_job_submission_client_and_prometheus_metrics(ray_head, tiny_pair, tmp_path):
    """Submit through the Python JobSubmissionClient, follow the job to success, and find the
    driver's and the workers' application metrics in the node's Prometheus text."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, _, metrics_port = ray_head
    student, teacher = tiny_pair
    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=(
            f"python jobs/distill.py --config jobs/configs/tiny.yaml --no-progress "
            f"model.student_path={student} model.teacher_path={teacher} run.steps=30 "
            f"run.name=metrics-test run.output_dir={tmp_path / 'out'}"
        ),
        runtime_env={"working_dir": str(REPO), "env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    wanted = [
        "ray_eopd_loss_total{",
        'run="metrics-test"',
        "ray_eopd_gate_frac",
        "ray_eopd_time_sync_s",
        "ray_eopd_worker_rollout_tokens_per_s{",
        'role="learner"',
        'rank="1"',
    ]
    seen, text = "", ""
    deadline = time.time() + 400
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        text = _scrape(metrics_port)
        if all(w in text for w in wanted):
            seen = text
        if status in (JobStatus.FAILED, JobStatus.STOPPED) or (
            status == JobStatus.SUCCEEDED and seen
        ):
            break
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]
    missing = [w for w in wanted if w not in seen]
    assert not missing, (missing, [line for line in text.splitlines() if "eopd" in line][:20])
