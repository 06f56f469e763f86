"""Reliability on a real local Ray: exact resume, SIGTERM, HF export, dead learner, NaN loss."""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from eopd_ray.config import load_config
from eopd_ray.core.invariants import InvariantError
from eopd_ray.driver.pipeline import Pipeline
from eopd_ray.telemetry.step_metrics import read_jsonl

from .conftest import TINY, tiny_overrides

pytestmark = pytest.mark.slow

# Wall-clock and throughput metrics differ between runs; everything else must be bit-identical:
# on CPU in fp32 every kernel is deterministic, vLLM samples with per-request seeds derived from
# (rollout.seed, step, rank), and DeepSpeed restores weights, AdamW moments and the scheduler.
VOLATILE = ("time/", "tokens_per_s", "roles/", "sync/")  # wall-clock measurements


def run(cfg) -> Pipeline:
    pipeline = Pipeline(cfg)
    try:
        pipeline.start()
        pipeline.run(progress="lines")
        return pipeline
    finally:
        pipeline.shutdown()


def test_resumed_run_repeats_the_uninterrupted_run_exactly(local_ray, tiny_pair, tmp_path):
    """A 4-step run checkpoints after step 1 and goes on; a copy of its directory as it would be
    had the run been killed after that checkpoint (the later checkpoint gone, metrics.jsonl
    holding more rows than the checkpoint covers) is resumed: steps 2-3 must be identical,
    held-out evaluations included (eval.every_steps=2: after steps 1 and 3)."""
    whole = tmp_path / "whole"
    run(
        load_config(
            TINY,
            tiny_overrides(
                tiny_pair,
                whole,
                "run.steps=4",
                "run.checkpoint_every=2",
                "run.export_hf=false",
                "eval.every_steps=2",
            ),
        )
    )
    split = tmp_path / "split"
    shutil.copytree(whole, split)
    shutil.rmtree(split / "checkpoints" / "step-000003")  # "killed" during step 2 or later
    resumed = run(
        load_config(
            TINY,
            tiny_overrides(
                tiny_pair,
                split,
                "run.steps=4",
                "run.resume=auto",
                "run.export_hf=false",
                "eval.every_steps=2",
            ),
        )
    )
    assert resumed.start_step == 2 and resumed.version == 4
    a, b = read_jsonl(whole / "metrics.jsonl"), read_jsonl(split / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(4))  # nothing missing, nothing repeated
    assert [r["step"] for r in b if "eval/avg@4" in r] == [1, 3]
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if not any(v in key for v in VOLATILE):
                assert rb[key] == value, (ra["step"], key, rb[key], value)
    resumed_id = load_config(split / "config.yaml").run.id
    assert resumed_id == load_config(whole / "config.yaml").run.id  # the same run, continued


def test_nan_teacher_stops_the_run_before_training_with_the_teacher_named(
    local_ray, tiny_pair, tmp_path
):
    broken = tmp_path / "nan-teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[1])
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))
    model.save_pretrained(broken)
    for f in tiny_pair[1].iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            (broken / f.name).write_bytes(f.read_bytes())
    cfg = load_config(
        TINY,
        tiny_overrides(
            (tiny_pair[0], broken),
            tmp_path / "run",
            # The fewest workers that reach the teacher's first scores (start-up is the cost).
            "rollout.num_workers=1",
            "learner.num_workers=1",
            "learner.zero_stage=0",
        ),
    )
    pipeline = Pipeline(cfg)
    try:
        pipeline.start()
        with pytest.raises(InvariantError, match=r"step 0, teacher\[0\] .*non-finite") as err:
            pipeline.run(progress="lines")
        assert err.value.worker.startswith("teacher[0]")
        # Stopped inside step 0, before training on the scores: no step was recorded.
        metrics = tmp_path / "run" / "metrics.jsonl"
        assert not metrics.exists() or not metrics.read_text().strip()
    finally:
        pipeline.shutdown()


def test_lost_workers_of_every_role_are_recovered(local_ray, tiny_pair, tmp_path, caplog):
    """One run, four faults: rollout-1 stopped (SIGSTOP) while it generates step 1 and the
    teacher stopped while it scores step 2 (hung, not dead: found by their heartbeat within
    run.worker_timeout_s, killed, restarted, the work redone), then learner-1 killed while it
    trains step 3 (ZeRO-3: partitioned state; the learner group replaced, back to the checkpoint
    after step 1, steps 2-3 trained again, step 2 exactly as the first time). Every step is in
    metrics.jsonl once; the restarted rollout worker holds exactly the current weights. Then
    rollout-1 stopped (SIGSTOP) as step 4's collective weight broadcast begins: its heartbeat
    finds it, it is killed, the workers left waiting in the broadcast are freed and the sync
    redone, long before sync.timeout_s."""
    out = tmp_path / "run"
    timeout_s = 8.0  # a busy 2-core box must not make a live worker look silent
    cfg = load_config(
        TINY,
        tiny_overrides(
            tiny_pair,
            out,
            "run.steps=5",
            "run.checkpoint_every=2",
            "run.export_hf=false",
            f"run.worker_timeout_s={timeout_s}",
            "learner.zero_stage=3",
            "sync.timeout_s=120",
            "sync.bucket_bytes=65536",  # many buckets: a broadcast with a middle to lose a peer in
            # The synchronous hand-off (its stages hooked below); the streamed step's losses:
            # tests/e2e/test_pipeline.py.
            "rollout.stream=false",
        ),
    )
    pipeline = Pipeline(cfg)
    score, train, step = pipeline._score, pipeline._train, pipeline.step
    launch = push = None  # the parts' own, once start() has made them (hook_parts)
    calls: list[tuple[int, dict]] = []

    took: dict[int, float] = {}

    def recorded_step(n):
        started = time.monotonic()
        metrics = step(n)
        took[n] = time.monotonic() - started
        calls.append((n, metrics))
        return metrics

    faults: dict[str, tuple[int, float]] = {}  # role -> (pid, when)

    def fault(role: str, rank: int, sig: int) -> None:
        if role not in faults:
            pid = getattr(pipeline, role).identities[rank].pid
            os.kill(pid, sig)
            faults[role] = (pid, time.time())

    def launch_then_stop_rollout(step):
        pending = launch(step)
        if step == 1:
            fault("rollout", 1, signal.SIGSTOP)
        return pending

    def stop_teacher_then_score(batch, step, *rest):
        if step == 2:
            fault("teacher", 0, signal.SIGSTOP)
        return score(batch, step, *rest)

    def kill_learner_then_train(batch, scores, step, *rest):
        if step == 3:
            fault("learner", 1, signal.SIGKILL)
        return train(batch, scores, step, *rest)

    pipeline._score = stop_teacher_then_score
    pipeline._train = kill_learner_then_train
    pipeline.step = recorded_step

    def push_and_lose_a_rollout_worker(version, what):
        if what == "step 4" and "broadcast" not in faults:
            # As step 4's broadcast begins: rollout-0 and the learner wait in the collective
            # for a peer that is gone (before: until sync.timeout_s, then a refused redo).
            learner_call = pipeline.learner.call_async

            def call_then_kill(method, *args, **kw):
                refs = learner_call(method, *args, **kw)
                if method == "broadcast_weights" and "broadcast" not in faults:
                    fault_pid = pipeline.rollout.identities[1].pid
                    os.kill(fault_pid, signal.SIGSTOP)  # hung inside the broadcast
                    faults["broadcast"] = (fault_pid, time.time())
                return refs

            pipeline.learner.call_async = call_then_kill
            try:
                return push(version, what)
            finally:
                pipeline.learner.call_async = learner_call
        return push(version, what)

    def hook_parts() -> None:
        """After start(), which makes the parts: their launches and pushes meet the faults."""
        nonlocal launch, push
        launch, push = pipeline.rollouts.launch, pipeline.weights.push
        pipeline.rollouts.launch = launch_then_stop_rollout
        pipeline.weights.push = push_and_lose_a_rollout_worker

    caplog.set_level("WARNING", logger="eopd_ray.driver.recovery")
    try:
        pipeline.start()
        hook_parts()
        history = pipeline.run(progress="lines")
        # The restarted rollout worker holds exactly the current weights.
        from eopd_ray.roles.rollout_engines import Sampling

        greedy = Sampling(temperature=0.0, max_new_tokens=8)
        refs = pipeline.rollout.call_async("generate", [[5, 6, 7]], [0], [0], greedy)
        a, b = pipeline.rollout.get(refs, 120, "greedy")
    finally:
        pipeline.shutdown()
        for pid, _ in faults.values():  # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert set(faults) == {"rollout", "teacher", "learner", "broadcast"}
    # The lost broadcast cost worker restarts, not the 120 s sync timeout.
    assert took[4] < 60, took
    assert torch.equal(a.response_ids, b.response_ids) and a.weight_version == b.weight_version
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert len(history) == 5 and pipeline.learner_failures == 1
    assert pipeline.num_recoveries == 4
    assert [h["rollout/weight_version"] for h in history] == [0, 1, 2, 3, 4]
    # Step 2 ran twice: before the learner loss and after going back to step 1's checkpoint;
    # the same prompts, seeds, weights and optimizer state give the same numbers.
    first, again = [m for n, m in calls if n == 2]
    for key, value in first.items():
        if not any(v in key for v in VOLATILE):
            assert again[key] == value, (key, again[key], value)
    messages = [(r.created, r.getMessage()) for r in caplog.records]
    for role in ("rollout", "teacher"):
        found = [
            when - faults[role][1]
            for when, m in messages
            if "stopped answering" in m and f"{role}[" in m.split("stopped answering")[0]
        ]
        assert found, messages
        # Found by the heartbeat, long before run.step_timeout_s (600 s).
        assert timeout_s <= found[0] <= timeout_s + 10, (role, found[0])
        print(f"{role} SIGSTOP: declared lost after {found[0]:.1f}s")
    assert any("restarting the learner group from" in m for _, m in messages), messages
    hung_in_sync = [
        when - faults["broadcast"][1]
        for when, m in messages
        if "step 4 weight sync" in m and "stopped answering" in m
    ]
    assert hung_in_sync and hung_in_sync[0] <= timeout_s + 10, messages
    print(f"rollout SIGSTOP in the broadcast: declared lost after {hung_in_sync[0]:.1f}s")
    print(*[m for _, m in messages if "restarted in" in m])


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    """jobs/distill.py's embedded Ray (workers.connect) binds every service to 127.0.0.1."""
    code = (
        "import os, subprocess\n"
        "os.environ.pop('RAY_ADDRESS', None)\n"
        "from eopd_ray.config import config_from_dict\n"
        "from eopd_ray.driver.actors import connect\n"
        "import ray\n"
        "connect(config_from_dict({'model': {'student_path': 's', 'teacher_path': 't'},"
        " 'data': {'toy_prompts': 8}}))\n"
        "import psutil\n"
        "me = psutil.Process()\n"  # this driver and the Ray it started (other tests' Rays run too)
        "tree = [me, *me.children(recursive=True)]\n"
        "mine = [c.laddr.ip for p in tree for c in p.net_connections('tcp')"
        " if c.status == psutil.CONN_LISTEN]\n"
        "print(sorted(set(mine)))\n"
        "print({n['NodeManagerAddress'] for n in ray.nodes()})\n"
        "ray.shutdown()\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    *_, listening, node = proc.stdout.strip().splitlines()
    assert node == "{'127.0.0.1'}"
    # No process of the embedded Ray listens beyond loopback.
    addresses = ast.literal_eval(listening)
    assert addresses and all(a in ("127.0.0.1", "::ffff:127.0.0.1") for a in addresses), addresses
