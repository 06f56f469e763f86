"""eopd_ray/driver/stopping.py: both SIGTERM exits that skip the normal shutdown (an abandoned
step, a stop during start-up) run the registered cleanups first: owner.json does not stay behind
(issue 33: the docs said it is removed on exit; after an abandoned stop it was not)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = """
import os, signal, sys, time
from eopd_ray.driver.stopping import StopOnSigterm, exit_on_sigterm, on_abrupt_exit
from eopd_ray.storage.run_claim import RunClaim
from eopd_ray.storage.run_storage import RunStorage

claim = RunClaim.acquire(RunStorage(sys.argv[1]), heartbeat_s=15.0)
claim.start()
on_abrupt_exit(claim.release)
if sys.argv[2] == "abandon":
    StopOnSigterm(grace_s=1.0, abandoned=lambda: "abandoned: resumes at step 3")
else:
    exit_on_sigterm()
print("claimed", flush=True)
time.sleep(60)  # a step (or a start-up) that does not end in time
"""


@pytest.mark.parametrize("how", ["abandon", "start-up"])
def test_a_sigterm_exit_removes_the_claim(tmp_path, how):
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(tmp_path), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "claimed"
    assert (tmp_path / "owner.json").exists()
    child.terminate()
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 143, stderr
    assert not (tmp_path / "owner.json").exists(), stderr
