"""Job submission of jobs/distill.py to a real `ray start --head` on this machine, and its
metrics read from the node's endpoint and through a real Prometheus server.

The head runs on free ports in its own temp dir and is stopped by signalling its own process
(never `ray stop`, which would kill every Ray cluster on the machine). Prometheus (Debian's
package) runs the same way, on loopback; without the binary only its test skips.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO, short_tmpdir
from .prometheus import INSTALL_HINT, Prometheus, find_prometheus

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


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


RUN = "metrics-test"
# What a user asks Prometheus: the loss of one run, and the loss per run whatever other tags
# (worker, session, node) a series carries.
QUERIES = (f'ray_eopd_loss_total{{run="{RUN}"}}', "sum by (run) (ray_eopd_loss_total)")


@dataclass
class MetricsRun:
    """What one job run left behind, for the tests below to judge."""

    status: str
    logs: str
    seen: str  # the last scrape of the node's /metrics that had every wanted name ("" if none)
    last: str  # the last scrape, for the failure message
    answers: dict[str, list[dict]] | None  # PromQL -> first non-empty result; None: no binary


WANTED = [
    "ray_eopd_loss_total{",
    f'run="{RUN}"',
    "ray_eopd_gate_frac",
    "ray_eopd_time_sync_s",
    "ray_eopd_worker_rollout_tokens_per_s{",
    'role="learner"',
    'rank="1"',
]


@pytest.fixture(scope="module")
def metrics_run(ray_head, tiny_pair, tmp_path_factory) -> MetricsRun:
    """One job (~35 s) serves both tests: submitted through the Python JobSubmissionClient while
    the node's metrics port is read raw and, when the binary is here, scraped by a real
    Prometheus that is asked the QUERIES during the run (a series goes stale once the driver's
    gauges leave the endpoint, so asking afterwards could miss it)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, _, metrics_port = ray_head
    student, teacher = tiny_pair
    binary = find_prometheus()
    server = Prometheus(binary, target=f"127.0.0.1:{metrics_port}") if binary else nullcontext()
    with server as prom:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=(
                f"python jobs/distill.py --config jobs/configs/tiny.yaml --no-progress "
                f"model.student_path={student} model.teacher_path={teacher} run.steps=30 "
                f"run.name={RUN} run.output_dir={tmp_path_factory.mktemp('job') / 'out'}"
            ),
            runtime_env={"working_dir": str(REPO), "env_vars": {"OMP_NUM_THREADS": "1"}},
        )
        seen, last, answers = "", "", {}
        deadline, ended_at = time.time() + 400, None
        while time.time() < deadline:
            status = client.get_job_status(job_id)
            last = _scrape(metrics_port)
            if all(w in last for w in WANTED):
                seen = last
            for q in QUERIES:
                if prom and q not in answers and (result := prom.query(q)):
                    answers[q] = result
            if status in (JobStatus.FAILED, JobStatus.STOPPED):
                break
            done = seen and (prom is None or len(answers) == len(QUERIES))
            if status == JobStatus.SUCCEEDED:
                ended_at = ended_at or time.time()
                # Gauges reach the endpoint ~15 s after they are set: allow that much after the end.
                if done or time.time() > ended_at + 30:
                    break
            time.sleep(2)
        return MetricsRun(
            status=str(status),
            logs=client.get_job_logs(job_id)[-4000:],
            seen=seen,
            last=last,
            answers=answers if prom else None,
        )


def test_job_submission_client_and_prometheus_metrics(metrics_run):
    """The job succeeds, and the driver's and the workers' application metrics are in the node's
    Prometheus text."""
    assert metrics_run.status == "SUCCEEDED", metrics_run.logs
    missing = [w for w in WANTED if w not in metrics_run.seen]
    eopd = [line for line in metrics_run.last.splitlines() if "eopd" in line][:20]
    assert not missing, (missing, eopd)


def test_a_real_prometheus_answers_promql_by_run(metrics_run):
    """A Prometheus server scraping the node during the run answers the per-run loss queries."""
    if metrics_run.answers is None:
        pytest.skip(INSTALL_HINT)
    assert metrics_run.status == "SUCCEEDED", metrics_run.logs
    missing = [q for q in QUERIES if q not in metrics_run.answers]
    assert not missing, (missing, metrics_run.answers)
    for q, result in metrics_run.answers.items():
        runs = {series["metric"].get("run") for series in result}
        assert runs == {RUN}, (q, result)
        for series in result:
            assert math.isfinite(float(series["value"][1])), (q, series)
