"""wait_for_placement on a real local Ray; describe_demand's message from plain dicts."""

from __future__ import annotations

import logging
import tempfile

import pytest

from eopd_ray.driver.placement import describe_demand, wait_for_placement


def test_describe_demand_names_roles_totals_and_keys_to_change():
    bundles = [("rollout", {"CPU": 0.5})] * 2 + [
        ("teacher", {"CPU": 0.5, "GPU": 1.0}),
        ("learner", {"CPU": 0.5000001, "GPU": 1.0, "accel": 2.0}),
    ]
    total = {"CPU": 16.0, "GPU": 1.0, "memory": 1e10, "node:10.0.0.1": 1.0}
    free = {"CPU": 15.25}  # Ray omits a kind when none of it is free

    message = describe_demand(bundles, total, free, num_nodes=1)

    assert message.startswith(
        "asked rollout 2 x {CPU: 0.5}; teacher 1 x {GPU: 1, CPU: 0.5}; "
        "learner 1 x {GPU: 1, CPU: 0.5, accel: 2} = {GPU: 2, CPU: 2, accel: 2} in 4 bundles | "
        "cluster has {GPU: 1, CPU: 16, accel: 0} on 1 node, free {GPU: 0, CPU: 15.25, accel: 0} | "
        "short of GPU, accel | "
    )
    # Only the keys that lower what is short: CPUs are plenty, and rollout asks for no GPU.
    assert (
        "fix: lower teacher.num_workers, teacher.gpus_per_worker, "
        "learner.num_workers, learner.gpus_per_worker, learner.resources; or add nodes"
    ) in message
    assert "cpus_per_worker" not in message and "rollout." not in message
    assert "memory" not in message and "node:" not in message  # kinds not asked for


def test_describe_demand_when_the_total_fits_but_a_bundle_does_not():
    # Two 2-CPU nodes: 4 CPUs free in total, yet no node can hold a 3-CPU bundle.
    message = describe_demand([("learner", {"CPU": 3.0})], {"CPU": 4.0}, {"CPU": 4.0}, num_nodes=2)
    assert "on 2 nodes" in message
    assert "a bundle fits on no single node" in message
    # Fewer workers would not help; smaller ones would.
    assert "fix: lower learner.cpus_per_worker; or start nodes with more resources" in message
    assert "num_workers" not in message


@pytest.fixture
def local_ray():
    import ray

    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="rp", dir="/tmp"),  # short: Ray's socket paths
    )
    yield ray
    ray.shutdown()


def test_wait_for_placement_warns_while_pending_and_returns_when_placed(local_ray, caplog):
    from ray.util.placement_group import placement_group, remove_placement_group

    caplog.set_level(logging.WARNING, logger="eopd_ray.driver.placement")

    # 2 x 1 CPU on a 1-CPU Ray can never be placed.
    too_big = [("rollout", {"CPU": 1.0})] * 2
    pg = placement_group([b for _, b in too_big], strategy="PACK")
    assert wait_for_placement(pg, too_big, timeout_s=1.6, interval_s=0.5) is False
    remove_placement_group(pg)

    warnings = [r for r in caplog.records if r.name == "eopd_ray.driver.placement"]
    assert len(warnings) >= 2, [r.getMessage() for r in warnings]
    for record in warnings:
        assert record.levelno == logging.WARNING
        message = record.getMessage()
        assert "still pending after" in message and "(timeout 1.6s)" in message
        assert "asked rollout 2 x {CPU: 1} = {CPU: 2} in 2 bundles" in message
        assert "cluster has {CPU: 1} on 1 node, free {CPU: 1}" in message
        assert "rollout.cpus_per_worker" in message

    caplog.clear()
    fits = [("rollout", {"CPU": 0.5})] * 2
    pg = placement_group([b for _, b in fits], strategy="PACK")
    # A slice long enough that a loaded machine still places it within the first one.
    assert wait_for_placement(pg, fits, timeout_s=30.0, interval_s=5.0) is True
    remove_placement_group(pg)
    assert [r for r in caplog.records if r.name == "eopd_ray.driver.placement"] == []
