"""A local head on a machine that is not empty (issue 26): another Ray holds Ray's default
ports, `cluster/local-head.sh up` (what `make cluster-up` runs) must still give a head that runs
jobs, `env` must point at it, and `down` must be prompt. Its own file so that pytest-xdist runs it
beside tests/e2e/test_local_cluster.py rather than after it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
