"""Multi-node on one machine: tiny.yaml with every role on a node of its own, and a run that loses
the rollout workers' node mid-run, then the learners' node, and still does every step exactly
once.

The nodes are `ray.cluster_utils.Cluster` nodes: separate raylets and object stores, all on
127.0.0.1, told apart by node id. The driver is `jobs/distill.py` joining through RAY_ADDRESS, as
under `ray job submit`. The test process never connects to the cluster: it only adds and removes
nodes and reads the GCS tables, so it cannot disturb another Ray (tests/e2e's `local_ray`, or
someone else's on this machine).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eopd_ray.config import load_config
from eopd_ray.telemetry.step_metrics import read_jsonl

from .conftest import REPO, TINY, short_tmpdir, tiny_overrides

pytestmark = pytest.mark.slow

STEPS = 10
LOSE_AT = 2  # the step during whose training the rollout node is lost
LOSE_LEARNERS_AT = 6  # ... and the learners' node (the newest checkpoint: after step 3)
# Ray declares a node dead after `failure_threshold` failed health checks `period_ms` apart
# (defaults 5 x 3 s; more when the node hangs instead of refusing connections). Still generous
# enough for a busy 2-core box not to declare a live node dead.
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 4,
}

# jobs/distill.py with one seam: the training of steps LOSE_AT and LOSE_LEARNERS_AT (the first
# time) waits until the test has taken a node down (it deletes the flag file). The rollout
# node's loss is then first seen by the weight sync, the stage with no other chance to notice it
# (a loss seen by the rollout stage is the kill in tests/e2e/test_reliability.py); the learners'
# node is lost while they wait to train.
DRIVER = """
import pathlib, runpy, sys, time
from eopd_ray.env import set_job_environment
set_job_environment()
from eopd_ray.driver.pipeline import Pipeline

flag, lose_at, script, *args = sys.argv[1:]
train, waited = Pipeline._train, set()

def _train(self, batch, scores, step, *rest):
    if str(step) in lose_at.split(",") and step not in waited:
        waited.add(step)
        pathlib.Path(flag).write_text(str(step))
        deadline = time.monotonic() + 120
        while pathlib.Path(flag).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    return train(self, batch, scores, step, *rest)

Pipeline._train = _train
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture
def cluster(monkeypatch):
    """A head with no CPUs (the GCS, and the driver's node) in its own short temp dir; the test
    adds the other nodes. Shut down even when the test fails."""
    import ray.experimental.internal_kv as internal_kv
    from ray.cluster_utils import Cluster

    # Starting and stopping a head node in this process repoints two process-wide things: Ray's
    # internal-KV client and the SIGTERM handler. A Ray this process is connected to (local_ray,
    # when other e2e tests ran first) gets its own back afterwards.
    kv_client = internal_kv.internal_kv_get_gcs_client()
    on_sigterm = signal.getsignal(signal.SIGTERM)
    temp = short_tmpdir("mn")
    # Cluster records its address in <RAY_TMPDIR>/ray/ray_current_cluster and deletes it on
    # shutdown: keep that file in our own temp dir, not the machine-wide /tmp/ray.
    os.makedirs(f"{temp}/ray")
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a local test cluster, like local_ray
    cluster = Cluster()  # the head is added inside the try: a failed start is cleaned up too
    try:
        cluster.add_node(
            num_cpus=0,
            include_dashboard=False,
            temp_dir=temp,
            node_ip_address="127.0.0.1",
            _system_config=FAST_NODE_DEATH,
        )
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if kv_client is not None:
            internal_kv._initialize_internal_kv(kv_client)
        signal.signal(signal.SIGTERM, on_sigterm)


def add_role_node(cluster, resource: str):
    """One CPU and one unit of `resource`: room for the two 0.5-CPU workers of the role whose
    `<role>.resources` is `{resource: 0.5}`."""
    return cluster.add_node(num_cpus=1, resources={resource: 1}, node_ip_address="127.0.0.1")


def lose_node(cluster, node) -> None:
    """The node dies at once, as in a power cut: its actors' processes and its raylet are
    killed together (`remove_node` alone kills the raylet and leaves the workers a moment to
    notice, during which the driver still reaches them)."""
    for actor in cluster.global_state.actor_table(None).values():
        if actor["Address"]["NodeID"] == node.node_id and actor["State"] == "ALIVE":
            os.kill(actor["Pid"], signal.SIGKILL)
    cluster.remove_node(node, allow_graceful=False)


def actors_by_name(cluster, run_id: str) -> dict[str, dict]:
    """This run's actors in the GCS actor table, by name (<run id>/<role>-<rank>)."""
    table = cluster.global_state.actor_table(None).values()
    return {a["Name"]: a for a in table if a["Name"].startswith(f"{run_id}/")}


def node_alive(cluster, node) -> bool:
    return any(
        n["NodeID"] == node.node_id and n["Alive"] for n in cluster.global_state.node_table()
    )


def wait_for(predicate, timeout_s: float, what: str, driver, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if driver.poll() is not None:
            pytest.fail(
                f"the driver exited ({driver.returncode}) while waiting for {what}:\n"
                + log.read_text()[-4000:]
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n" + log.read_text()[-4000:])
        time.sleep(0.1)


def test_roles_on_their_own_nodes_and_lost_rollout_and_learner_nodes_are_survived(
    cluster, tiny_pair, tmp_path
):
    rollout_node = add_role_node(cluster, "rollout_node")
    teacher_node = add_role_node(cluster, "teacher_node")
    learner_node = add_role_node(cluster, "learner_node")
    out, flag, log = tmp_path / "run", tmp_path / "losing", tmp_path / "driver.log"
    overrides = tiny_overrides(
        tiny_pair,
        out,
        f"run.steps={STEPS}",
        "run.checkpoint_every=4",
        "run.export_hf=false",
        "run.max_worker_restarts=2",
        "run.step_timeout_s=120",
        "sync.timeout_s=60",
        "rollout.resources={rollout_node: 0.5}",
        "teacher.resources={teacher_node: 0.5}",
        "learner.resources={learner_node: 0.5}",
    )
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    script = str(REPO / "jobs" / "distill.py")
    lose = f"{LOSE_AT},{LOSE_LEARNERS_AT}"
    args = [str(flag), lose, script, "--config", str(TINY), "--no-progress", *overrides]
    with open(log, "w") as sink:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, *args],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        wait_for(flag.exists, 300, f"step {LOSE_AT}'s training", driver, log)
        metrics = out / "metrics.jsonl"
        assert [r["step"] for r in read_jsonl(metrics)] == list(range(LOSE_AT))

        # Every role on its own node: its custom resource puts its bundles there.
        run_id = load_config(out / "config.yaml").run.id
        placed = {
            name: a["Address"]["NodeID"] for name, a in actors_by_name(cluster, run_id).items()
        }
        assert placed == {
            **{f"{run_id}/rollout-{i}": rollout_node.node_id for i in range(2)},
            f"{run_id}/teacher-0": teacher_node.node_id,
            **{f"{run_id}/learner-{i}": learner_node.node_id for i in range(2)},
        }

        # Room for the rollout workers on another node, then theirs is lost mid-step.
        spare = add_role_node(cluster, "rollout_node")
        lost_at = time.monotonic()
        lose_node(cluster, rollout_node)
        flag.unlink()  # training goes on; the weight sync finds the workers gone
        wait_for(lambda: not node_alive(cluster, rollout_node), 60, "node death", driver, log)
        declared_dead_s = time.monotonic() - lost_at

        def restarted_on_spare() -> bool:
            rollouts = [
                actors_by_name(cluster, run_id).get(f"{run_id}/rollout-{i}") for i in (0, 1)
            ]
            return all(
                a and a["State"] == "ALIVE" and a["Address"]["NodeID"] == spare.node_id
                for a in rollouts
            )

        wait_for(restarted_on_spare, 120, "the rollout workers on the spare node", driver, log)
        restarted_s = time.monotonic() - lost_at

        # Later the learners' node goes: the learner group is replaced on a spare node and the
        # run goes back to the checkpoint after step 3.
        wait_for(
            lambda: flag.exists() and flag.read_text() == str(LOSE_LEARNERS_AT),
            300,
            f"step {LOSE_LEARNERS_AT}'s training",
            driver,
            log,
        )
        spare_learners = add_role_node(cluster, "learner_node")
        lose_node(cluster, learner_node)
        flag.unlink()
        assert driver.wait(timeout=300) == 0, log.read_text()[-4000:]
        finished_s = time.monotonic() - lost_at
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    output = log.read_text()
    print(
        f"after the node was lost: declared dead {declared_dead_s:.1f}s, rollout workers alive "
        f"on the spare node {restarted_s:.1f}s, run finished {finished_s:.1f}s"
    )

    assert [r["step"] for r in read_jsonl(metrics)] == list(range(STEPS))  # each exactly once
    assert f"step {LOSE_AT} weight sync: " in output and "restarting and redoing it" in output
    actors = actors_by_name(cluster, run_id)
    for rank in range(2):
        rollout = actors[f"{run_id}/rollout-{rank}"]
        assert rollout["NumRestarts"] == 1 and rollout["Address"]["NodeID"] == spare.node_id
    assert actors[f"{run_id}/teacher-0"]["NumRestarts"] == 0
    # The learner group lost with its node was replaced by one on the spare learner node, which
    # loaded the newest checkpoint (after step 3): steps 4-6 trained again, each in metrics once.
    # A group started while the lost node was not yet declared dead is lost with it, and
    # replaced again (each attempt counted against run.max_failures, 3 by default).
    assert "restarting the learner group from" in output and "step-000003" in output
    print("learner node lost:", re.findall(r"learner group restarted in [\d.]+s", output))
    for rank in range(2):
        assert actors[f"{run_id}/learner-{rank}"]["State"] == "DEAD"
        # <run id>/learner-<rank>.from-<step>.restart-<attempt> (actors.actor_name)
        pattern = re.compile(rf"{re.escape(run_id)}/learner-{rank}\.from-\d+\.restart-(\d+)")
        attempts = {int(m[1]): n for n in actors if (m := pattern.fullmatch(n))}
        assert attempts and max(attempts) <= 3, sorted(actors)
        last_group = actors[attempts[max(attempts)]]
        assert last_group["Address"]["NodeID"] == spare_learners.node_id
    # The last checkpoint is complete, with the optimizer shard of every learner rank.
    last = out / "checkpoints" / f"step-{STEPS - 1:06d}"
    assert (last / "state.json").is_file()
    shards = sorted(p.name for p in (last / "learner").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2, shards
