"""Reliability on a real local Ray: exact resume, SIGTERM, HF export, dead learner, NaN loss."""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from eopd_ray.config import load_config
from eopd_ray.core.invariants import InvariantError
from eopd_ray.driver.actors import WorkerError
from eopd_ray.driver.pipeline import Pipeline
from eopd_ray.telemetry.step_metrics import read_jsonl

from .conftest import TINY, tiny_overrides

pytestmark = pytest.mark.slow

# Wall-clock and throughput metrics differ between runs; everything else must be bit-identical:
# on CPU in fp32 every kernel is deterministic, vLLM samples with per-request seeds derived from
# (rollout.seed, step, rank), and DeepSpeed restores weights, AdamW moments and the scheduler.
VOLATILE = ("time/", "tokens_per_s")


def run(cfg) -> Pipeline:
    pipeline = Pipeline(cfg)
    try:
        pipeline.start()
        pipeline.run(progress="lines")
        return pipeline
    finally:
        pipeline.shutdown()


def test_resumed_run_repeats_the_uninterrupted_run_exactly(local_ray, tiny_pair, tmp_path):
    """A 6-step run checkpoints after step 2 and goes on; a copy of its directory as it would be
    had the run been killed after that checkpoint (the later checkpoint gone, metrics.jsonl
    holding more rows than the checkpoint covers) is resumed: steps 3-5 must be identical,
    held-out evaluations included (eval.every_steps=2: after steps 1, 3 and 5)."""
    whole = tmp_path / "whole"
    run(
        load_config(
            TINY,
            tiny_overrides(
                tiny_pair,
                whole,
                "run.steps=6",
                "run.checkpoint_every=3",
                "run.export_hf=false",
                "eval.every_steps=2",
            ),
        )
    )
    split = tmp_path / "split"
    shutil.copytree(whole, split)
    shutil.rmtree(split / "checkpoints" / "step-000005")  # "killed" during step 3 or later
    resumed = run(
        load_config(
            TINY,
            tiny_overrides(
                tiny_pair,
                split,
                "run.steps=6",
                "run.resume=auto",
                "run.export_hf=false",
                "eval.every_steps=2",
            ),
        )
    )
    assert resumed.start_step == 3 and resumed.version == 6
    a, b = read_jsonl(whole / "metrics.jsonl"), read_jsonl(split / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(6))  # nothing missing, nothing repeated
    assert [r["step"] for r in b if "eval/avg@4" in r] == [1, 3, 5]
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
    cfg = load_config(TINY, tiny_overrides((tiny_pair[0], broken), tmp_path / "run"))
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


def test_dead_workers_rollout_and_teacher_recovered_learner_fails_fast(
    local_ray, tiny_pair, tmp_path
):
    out = tmp_path / "run"
    cfg = load_config(
        TINY,
        tiny_overrides(
            tiny_pair, out, "run.steps=5", "run.export_hf=false", "run.step_timeout_s=60"
        ),
    )
    pipeline = Pipeline(cfg)
    try:
        pipeline.start()
        history = [pipeline.step(0)]
        os.kill(pipeline.rollout.identities[1].pid, signal.SIGKILL)  # dies between steps
        history.append(pipeline.step(1))
        os.kill(pipeline.teacher.identities[0].pid, signal.SIGKILL)
        history += [pipeline.step(2), pipeline.step(3)]
        assert pipeline.num_recoveries == 2 and pipeline.version == 4
        # The restarted rollout worker holds exactly the current weights.
        from eopd_ray.roles.rollout import Sampling

        greedy = Sampling(temperature=0.0, max_new_tokens=8)
        refs = pipeline.rollout.call_async("generate", [[5, 6, 7]], [0], [0], greedy)
        a, b = pipeline.rollout.get(refs, 120, "greedy")
        assert torch.equal(a.response_ids, b.response_ids) and a.weight_version == 4
        # A learner holds optimizer state: its death fails the step, naming it and the checkpoint.
        saved = pipeline.save_checkpoint(3)
        os.kill(pipeline.learner.identities[1].pid, signal.SIGKILL)
        with pytest.raises(WorkerError) as exc:
            pipeline.step(4)
    finally:
        pipeline.shutdown()
    assert [h["rollout/weight_version"] for h in history] == [0, 1, 2, 3]
    assert "learner[1]" in str(exc.value) and saved.uri in str(exc.value)


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
