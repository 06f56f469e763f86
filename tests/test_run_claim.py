"""One driver per run directory (review finding 3): a second driver on the same run.output_dir
is refused while the first one's claim is live, takes over a dead one's, and a driver whose
claim was taken over stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from eopd_ray.storage.run_claim import CLAIM, ClaimLost, RunClaim, RunDirectoryInUse
from eopd_ray.storage.run_storage import RunStorage


def other_drivers_claim(store, host="node-7", pid=4242, age_s=0.0, heartbeat_s=15.0):
    store.write_text(
        CLAIM,
        json.dumps(
            {
                "owner": "someone-else",
                "run_id": "toy-20261204-000000-abcd",
                "host": host,
                "pid": pid,
                "heartbeat": time.time() - age_s,
                "heartbeat_s": heartbeat_s,
            }
        ),
    )


def test_a_live_claim_on_another_node_is_refused_with_how_to_take_over(store):
    other_drivers_claim(store, age_s=5)
    with pytest.raises(RunDirectoryInUse) as err:
        RunClaim.acquire(store, heartbeat_s=15.0)
    message = str(err.value)
    assert "toy-20261204-000000-abcd on host node-7 (pid 4242)" in message
    assert "another run.output_dir" in message and "expires 60 s" in message
    assert store.show(CLAIM) in message
    assert json.loads(store.read_text(CLAIM))["owner"] == "someone-else"  # untouched


def test_an_expired_claim_is_taken_over(store):
    other_drivers_claim(store, age_s=61)
    claim = RunClaim.acquire(store, heartbeat_s=15.0)
    assert json.loads(store.read_text(CLAIM))["owner"] == claim.token
    claim.release()
    assert not store.exists(CLAIM)


def test_a_driver_whose_claim_was_taken_over_stops(store):
    claim = RunClaim.acquire(store, heartbeat_s=0.2)
    claim.set_run_id("mine")
    claim.start()
    claim.check("step 0")
    other_drivers_claim(store)  # the other driver decided this one was dead
    deadline = time.monotonic() + 10
    with pytest.raises(ClaimLost, match=r"step 3: this driver no longer owns run\.output_dir"):
        while time.monotonic() < deadline:
            claim.check("step 3")
            time.sleep(0.05)
    claim.release()
    assert json.loads(store.read_text(CLAIM))["owner"] == "someone-else"  # not deleted


def test_a_second_driver_process_is_refused_until_the_first_is_gone(tmp_path):
    """Two real processes on this host: the second is refused while the first holds the claim
    and gets the directory as soon as the first is killed (no waiting for the expiry)."""
    run = tmp_path / "run"
    code = (
        "import sys, time\n"
        "from eopd_ray.storage.run_claim import RunClaim\n"
        "from eopd_ray.storage.run_storage import RunStorage\n"
        f"claim = RunClaim.acquire(RunStorage({str(run)!r}), heartbeat_s=30.0)\n"
        "claim.set_run_id('first')\n"
        "claim.start()\n"
        "print('claimed', flush=True)\n"
        "time.sleep(120)\n"
    )
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "claimed"
        store = RunStorage(str(run))
        with pytest.raises(RunDirectoryInUse, match=rf"run first on host .* \(pid {first.pid}\)"):
            RunClaim.acquire(store, heartbeat_s=30.0)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    claim = RunClaim.acquire(store, heartbeat_s=30.0)  # the first process is gone
    claim.release()
