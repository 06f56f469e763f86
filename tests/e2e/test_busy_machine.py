"""A local head on a machine that is not empty (issue 26): another Ray holds Ray's default
ports, `cluster/local-head.sh up` (what `make cluster-up` runs) must still give a head that runs
jobs, `env` must point at it, and `down` must be prompt. Its own file so that pytest-xdist runs it
beside tests/e2e/test_local_cluster.py rather than after it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eopd_ray.ports import free_ports

from .conftest import short_tmpdir
from .test_local_cluster import BIN, clean_clone, head_env, head_up, submit

pytestmark = pytest.mark.slow


BLOCKER = """
import signal, sys, time
import ray
ray.init(num_cpus=1, include_dashboard=True, dashboard_port=8265, _temp_dir=sys.argv[1])
print("embedded ray up", flush=True)
signal.signal(signal.SIGTERM, lambda *_: (ray.shutdown(), sys.exit(0)))
time.sleep(600)
"""

DEFAULT_PORTS = (8265, 6379, 8080, 52365, 10001)


def held(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return False
        except OSError:
            return True


def test_a_head_comes_up_beside_an_embedded_ray_on_the_default_ports(tmp_path_factory):
    """Issue 26: with an embedded Ray (what `make run` starts) on Ray's default dashboard and
    agent ports, `cluster/local-head.sh up` said "up" and every job failed with "No available
    agent", or ran on the other Ray. Now: the held defaults are replaced by free ports, `env`
    points at this head, and a submitted tiny job succeeds. Ports the embedded Ray did not
    take are held by plain listeners, so every default is busy."""
    clone = clean_clone(tmp_path_factory.mktemp("clone_busy"))
    home = Path(short_tmpdir("home"))
    ray_tmp, head_tmp = short_tmpdir("emb"), short_tmpdir("lh")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "EOPD_RAY"))}
    base.update(HOME=str(home), VENV_BIN=str(BIN), RAY_TEMP_DIR=head_tmp)
    blocker = subprocess.Popen(
        [sys.executable, "-c", BLOCKER, ray_tmp],
        env=base | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    listeners = []
    try:
        assert blocker.stdout.readline().strip() == "embedded ray up"
        for port in DEFAULT_PORTS:
            if not held(port):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                sock.listen()
                listeners.append(sock)
        up = head_up(clone, base)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "default port 8265 (DASHBOARD_PORT) is held by" in up.stdout
        # What `make cluster-up` shows: Ray's renamed processes unpadded, no blank lines.
        said = [line for line in up.stdout.splitlines() if "default port 8265" in line]
        assert "  " not in said[0] and " )" not in said[0], said
        assert "" not in (up.stdout + up.stderr).splitlines(), up.stdout + up.stderr
        assert "a test job ran" in up.stdout
        env = head_env(clone, base)
        assert not env["RAY_ADDRESS"].endswith(":8265"), env["RAY_ADDRESS"]
        job = submit(
            env, clone, "--config", "jobs/configs/tiny.yaml", "run.steps=1", job_id="beside"
        )
        log = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in log, log[-3000:]
    finally:
        started = time.monotonic()
        subprocess.run(["bash", "cluster/local-head.sh", "down"], cwd=clone, env=base, timeout=90)
        down_s = time.monotonic() - started
        for sock in listeners:
            sock.close()
        blocker.terminate()
        try:
            blocker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            blocker.kill()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert down_s < 8, f"cluster-down took {down_s:.1f} s"


# What a submitted driver joins (eopd_ray.driver.actors.connect), and where that head keeps its
# session: printed by a job, compared with the head the job was submitted to.
PROBE = (
    "import ray\n"
    "from eopd_ray.config import Config\n"
    "from eopd_ray.driver.actors import connect\n"
    "connect(Config())\n"
    "node = ray._private.worker._global_node\n"
    "print('joined', node.gcs_address, node.get_session_dir_path())\n"
)


def head_settings(home: Path, ports: list[int]) -> dict[str, str]:
    dash, gcs, metrics, client, agent, agent_grpc, runtime_env = ports
    return dict(
        HOME=str(home),
        DASHBOARD_PORT=str(dash),
        GCS_PORT=str(gcs),
        METRICS_PORT=str(metrics),
        DASHBOARD_AGENT_PORT=str(agent),
        CLIENT_PORT=str(client),
        RAY_START_ARGS=(
            f"--dashboard-agent-grpc-port={agent_grpc} --runtime-env-agent-port={runtime_env}"
        ),
    )


def probe(env: dict[str, str], clone: Path) -> tuple[str, str, str]:
    """(GCS address, session dir) the probe job's driver joined, and its log."""
    proc = subprocess.run(
        ["ray", "job", "submit", "--", "python", "-c", PROBE],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    log = proc.stdout + proc.stderr
    joined = [line.split() for line in log.splitlines() if line.startswith("joined ")]
    assert proc.returncode == 0 and joined, log[-3000:]
    return joined[-1][1], joined[-1][2], log


def test_jobs_run_on_the_head_they_are_submitted_to_beside_other_heads(tmp_path_factory):
    """Issue 33: with two of our heads and a plain `ray start --head` on one machine, each job
    runs on the head it was submitted to. Ray's job supervisor hands the driver the address in
    `ray_current_cluster` of the head's temp dir, which the latest `ray start --head` with that
    temp dir rewrites. Head A takes the script's default (a temp dir of its own); head B is given
    Ray's shared default (a head started before the fix), which the plain head then rewrites: the
    driver must still join B, and `up` on B must see that its jobs are sent elsewhere. TMPDIR
    makes Ray's "shared default" this test's own ($TMPDIR/ray), never the machine's /tmp/ray."""
    clone = clean_clone(tmp_path_factory.mktemp("clone_heads"))
    tmp = Path(short_tmpdir("th"))
    home_a, home_b = tmp / "a", tmp / "b"
    ports = free_ports(21)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "EOPD_RAY"))}
    base.update(VENV_BIN=str(BIN), TMPDIR=str(tmp))
    env_a = base | head_settings(home_a, ports[:7])
    env_b = base | head_settings(home_b, ports[7:14]) | {"RAY_TEMP_DIR": str(tmp / "ray")}
    plain_ports = ports[14:]
    plain = None
    try:
        for env in (env_a, env_b):
            up = head_up(clone, env)
            assert up.returncode == 0, up.stdout + up.stderr
        # A plain head with Ray's default temp dir, started last: it owns ray_current_cluster.
        flags = ["--port", "--metrics-export-port", "--ray-client-server-port"]
        flags += ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
        flags += ["--runtime-env-agent-port"]
        plain = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
            + ["--include-dashboard=false", "--num-cpus=1"]
            + [f"{f}={port}" for f, port in zip(flags, plain_ports[: len(flags)], strict=True)],
            env=base | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        current = tmp / "ray" / "ray_current_cluster"
        deadline = time.time() + 60
        while f":{plain_ports[0]}" not in (current.read_text() if current.exists() else ""):
            assert time.time() < deadline and plain.poll() is None, "the plain head did not start"
            time.sleep(0.5)

        gcs_a, session_a, _ = probe(head_env(clone, env_a), clone)
        assert gcs_a == f"127.0.0.1:{env_a['GCS_PORT']}"
        # A's own temp dir: neither Ray's shared default here nor the machine's /tmp/ray.
        assert session_a.startswith(f"{tmp}/eopd-head-"), session_a
        gcs_b, session_b, log_b = probe(head_env(clone, env_b), clone)
        assert gcs_b == f"127.0.0.1:{env_b['GCS_PORT']}", log_b[-3000:]
        assert session_b.startswith(f"{tmp}/ray/"), session_b
        assert f"RAY_ADDRESS=127.0.0.1:{plain_ports[0]} is not the Ray head" in log_b

        again_a = head_up(clone, env_a)
        assert again_a.returncode == 0, again_a.stdout + again_a.stderr
        assert "already running" in again_a.stdout and "a test job ran on it" in again_a.stdout
        again_b = head_up(clone, env_b)
        assert again_b.returncode != 0, again_b.stdout + again_b.stderr
        assert f"another Ray (gcs-address 127.0.0.1:{plain_ports[0]})" in again_b.stderr
        assert "\n\n" not in again_b.stderr and not again_b.stderr.startswith("\n")
        assert "does not run jobs on itself" in again_b.stderr and " down && " in again_b.stderr
    finally:
        for env in (env_a, env_b):
            down = ["bash", "cluster/local-head.sh", "down"]
            subprocess.run(down, cwd=clone, env=env, timeout=90)
        if plain is not None:
            os.killpg(plain.pid, signal.SIGTERM)
            try:
                plain.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(plain.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
