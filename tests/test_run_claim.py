"""One driver per run directory (review finding 3): a second driver on the same run.output_dir
is refused while the first one's claim is live, takes over a dead one's, and a driver whose
claim was taken over stops. Issue 31 finding 4: a pid is judged only within the pid namespace
of the same boot, and a fresh heartbeat is never taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from eopd_ray.storage.run_claim import (
    CLAIM,
    ClaimLost,
    RunClaim,
    RunDirectoryInUse,
    _boot_id,
    _pid_namespace,
)
from eopd_ray.storage.run_storage import RunStorage


def other_drivers_claim(store, host="node-7", pid=4242, age_s=0.0, heartbeat_s=15.0, **more):
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
                **more,
            }
        ),
    )


def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    return gone.pid


OLD_CLAIM = {"host": socket.gethostname()}  # written before boot_id / pid_ns were recorded


def here(**changed) -> dict:
    """This host's identity as a claim records it, with `changed` fields."""
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace()} | (
        changed
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


def test_a_second_driver_process_is_refused_until_the_first_is_gone(tmp_path, caplog):
    """Two real processes on this host: the second is refused while the first holds the claim
    and gets the directory once the first is killed and its heartbeat not renewed (no waiting
    for the expiry)."""
    run = tmp_path / "run"
    code = (
        "import sys, time\n"
        "from eopd_ray.storage.run_claim import RunClaim\n"
        "from eopd_ray.storage.run_storage import RunStorage\n"
        f"claim = RunClaim.acquire(RunStorage({str(run)!r}), heartbeat_s=1.0)\n"
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
            RunClaim.acquire(store, heartbeat_s=1.0)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="eopd_ray.storage.run_claim"):
        claim = RunClaim.acquire(store, heartbeat_s=1.0)  # the first process is gone
    assert "(its process is gone)" in caplog.text  # not "(its claim expired)"
    claim.release()


@pytest.mark.parametrize("pid_space", ["another pid namespace", "an old claim"])
def test_a_renewed_claim_from_another_pid_space_holds_whatever_the_pid_says(store, pid_space):
    """A driver in another container with host networking has this host's name and a pid that
    is dead here: while it renews its claim, the claim holds."""
    identity = {
        "another pid namespace": here(pid_ns=(_pid_namespace() or 0) + 1),
        "an old claim": OLD_CLAIM,
    }[pid_space]
    pid, stop = dead_pid(), threading.Event()

    def renew() -> None:  # as RunClaim.renew: read first, never write back a lost claim
        while not stop.is_set():
            if json.loads(store.read_text(CLAIM))["owner"] != "someone-else":
                return
            other_drivers_claim(store, pid=pid, heartbeat_s=0.3, **identity)
            stop.wait(0.3)

    other_drivers_claim(store, pid=pid, heartbeat_s=0.3, **identity)

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        with pytest.raises(RunDirectoryInUse, match=rf"\(pid {pid}\), last heartbeat"):
            RunClaim.acquire(store, heartbeat_s=0.3)
    finally:
        stop.set()
        renewer.join(timeout=10)
    assert json.loads(store.read_text(CLAIM))["owner"] == "someone-else"


@pytest.mark.parametrize("identity", [here(pid_ns=-1), here(boot_id="another boot"), OLD_CLAIM])
def test_a_pid_is_judged_only_in_the_same_boot_and_pid_namespace(store, identity):
    """Between 2 and 4 heartbeats old, a claim whose pid is dead here still holds unless the pid
    was looked up where it means something; the expiry then frees it."""
    pid = dead_pid()
    other_drivers_claim(store, pid=pid, age_s=45, **identity)
    with pytest.raises(RunDirectoryInUse, match="expires 60 s"):
        RunClaim.acquire(store, heartbeat_s=15.0)
    other_drivers_claim(store, pid=pid, age_s=61, **identity)
    RunClaim.acquire(store, heartbeat_s=15.0).release()


def test_a_gone_process_of_this_pid_space_is_taken_over_at_once(store):
    """Here a pid is looked up where it means something, with its start time: a resubmission
    after a crash does not wait for the heartbeat to age."""
    other_drivers_claim(store, pid=dead_pid(), heartbeat_s=15.0, **here())
    started = time.monotonic()
    claim = RunClaim.acquire(store, heartbeat_s=15.0)
    assert time.monotonic() - started < 5
    assert json.loads(store.read_text(CLAIM))["owner"] == claim.token
    claim.release()


def test_a_claim_records_the_boot_and_pid_namespace(store):
    claim = RunClaim.acquire(store, heartbeat_s=15.0)
    record = json.loads(store.read_text(CLAIM))
    assert record["boot_id"] == _boot_id() and record["pid_ns"] == _pid_namespace()
    assert record["boot_id"] is not None and record["pid_ns"] is not None  # Linux
    claim.release()
