"""Preemption: SIGTERM with a step in flight that cannot finish within `run.stop_grace_s`.

jobs/distill.py (embedded Ray, its own process group) runs tiny.yaml with a checkpoint after
every step; step SLOW_AT's training is held far longer than the grace period. SIGTERM arrives
while it is held: the driver must be gone within the grace period, say which step the next run
resumes at, leave the newest complete checkpoint as it was, and leave no Ray process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from eopd_ray.storage import checkpoint
from eopd_ray.storage.run_storage import RunStorage

from .conftest import REPO, TINY, tiny_overrides

pytestmark = pytest.mark.slow

SLOW_AT = 1
GRACE_S = 8.0

DRIVER = """
import pathlib, runpy, sys, time
from eopd_ray.env import set_job_environment
set_job_environment()
from eopd_ray.driver.pipeline import Pipeline

flag, slow_at, script, *args = sys.argv[1:]
train = Pipeline._train

def _train(self, batch, scores, step, *rest):
    if step == int(slow_at):  # a step far longer than the grace period
        pathlib.Path(flag).write_text("training")
        time.sleep(600)
    return train(self, batch, scores, step, *rest)

Pipeline._train = _train
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


def alive_in_group(pgid: int) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def test_a_step_longer_than_the_grace_period_is_abandoned_in_time(tiny_pair, tmp_path):
    out, flag = tmp_path / "run", tmp_path / "slow-step-started"
    overrides = tiny_overrides(
        tiny_pair,
        out,
        "run.steps=4",
        "run.checkpoint_every=1",
        "run.resume=auto",
        "run.export_hf=false",
        f"run.stop_grace_s={GRACE_S}",
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [
            *(sys.executable, "-c", DRIVER, str(flag), str(SLOW_AT)),
            *(str(REPO / "jobs" / "distill.py"), "--no-progress", "--config", str(TINY)),
            *overrides,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the slow step never started"
            time.sleep(0.2)
        signalled = time.monotonic()
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=GRACE_S + 30)
        took = time.monotonic() - signalled
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 143, stderr[-3000:]
    assert took <= GRACE_S, f"the driver took {took:.1f}s to go, run.stop_grace_s = {GRACE_S}"
    assert f"step {SLOW_AT} could not finish and checkpoint within run.stop_grace_s" in stderr
    assert f"resumes at step {SLOW_AT} from " in stderr, stderr[-2000:]
    store = RunStorage(str(out))
    assert [k.step for k in checkpoint.complete_checkpoints(store)] == [SLOW_AT - 1]
    deadline = time.monotonic() + 20
    while alive_in_group(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive_in_group(driver.pid) == []  # the embedded Ray went with the driver
