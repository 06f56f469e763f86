"""eopd_ray/driver/job_head.py: a submitted driver joins the head whose raylet started it, not the
address Ray's job supervisor read from a temp dir another head may share (issue 33).
tests/e2e/test_busy_machine.py runs it with two heads of ours and a plain one on one machine."""

from __future__ import annotations

import logging

from eopd_ray.driver.job_head import JOB_ENV_VAR, address_to_join, gcs_address_of_raylet

# The shape of a raylet's command line (Ray 2.60), shortened.
RAYLET = [
    "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet",
    "--raylet_socket_name=/tmp/eopd-head-1a2b3c4d/session_x/sockets/raylet",
    "--node_ip_address=127.0.0.1",
    "--python_worker_command=/venv/bin/python3 .../default_worker.py --node-ip-address=127.0.0.1 "
    "--gcs-address=127.0.0.1:41234 --session-name=session_x --temp-dir=/tmp/eopd-head-1a2b3c4d",
]
SHELL = ["/bin/sh", "-c", "python jobs/distill.py --config jobs/configs/tiny.yaml"]
SUPERVISOR = ["ray::JobSupervisor", "", "", ""]  # Ray's workers rename themselves


def test_the_gcs_address_is_read_from_a_raylets_command_line_only():
    assert gcs_address_of_raylet(RAYLET) == "127.0.0.1:41234"
    assert gcs_address_of_raylet(SHELL) is None
    assert gcs_address_of_raylet(SUPERVISOR) is None
    assert gcs_address_of_raylet([]) is None
    log_monitor = ["/venv/bin/python", "-u", "log_monitor.py", "--gcs-address=127.0.0.1:1"]
    assert gcs_address_of_raylet(log_monitor) is None


def test_a_job_joins_the_head_whose_raylet_started_it(monkeypatch, caplog):
    """RAY_ADDRESS names another head (the temp dir's ray_current_cluster was rewritten)."""
    ancestors = [SHELL, SUPERVISOR, RAYLET, ["/sbin/init"]]
    monkeypatch.setattr("eopd_ray.driver.job_head._ancestor_cmdlines", lambda: iter(ancestors))
    env = {"RAY_ADDRESS": "127.0.0.1:6379", JOB_ENV_VAR: "{}"}
    with caplog.at_level(logging.WARNING):
        assert address_to_join(env) == "127.0.0.1:41234"
    assert "RAY_ADDRESS=127.0.0.1:6379 is not the Ray head that runs this job" in caplog.text
    caplog.clear()
    assert address_to_join(env | {"RAY_ADDRESS": "127.0.0.1:41234"}) == "127.0.0.1:41234"
    assert not caplog.text


def test_outside_a_job_or_without_a_raylet_parent_ray_address_is_used(monkeypatch):
    monkeypatch.setattr("eopd_ray.driver.job_head._ancestor_cmdlines", lambda: iter([RAYLET]))
    # Not a submitted job (no supervisor's variable): RAY_ADDRESS is the user's choice.
    assert address_to_join({"RAY_ADDRESS": "10.0.0.5:6379"}) == "10.0.0.5:6379"
    # A job whose supervisor is gone (the driver was re-parented): nothing better to go on.
    monkeypatch.setattr("eopd_ray.driver.job_head._ancestor_cmdlines", lambda: iter([SHELL]))
    env = {"RAY_ADDRESS": "127.0.0.1:6379", JOB_ENV_VAR: "{}"}
    assert address_to_join(env) == "127.0.0.1:6379"


def test_the_real_process_tree_of_a_test_has_no_raylet():
    assert address_to_join({"RAY_ADDRESS": "auto", JOB_ENV_VAR: "{}"}) == "auto"
