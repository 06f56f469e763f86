"""Toy preparation: trained models + prompt files, cached under a key of every setting."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from eopd_ray.toy.chain import ChainTask
from eopd_ray.toy.models import TinyModelSpec
from eopd_ray.toy.prepare import (
    ToySettings,
    load_baseline,
    load_settings,
    prepare_toy,
    read_prompts,
)
from eopd_ray.toy.task import GraphTask

SMALL = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1)
QUICK = ToySettings(teacher=SMALL, student=SMALL, teacher_steps=3, student_steps=2, batch_size=8)


def test_prepare_builds_once_and_caches_by_settings(tmp_path):
    logs: list[str] = []
    prepared = prepare_toy(tmp_path, QUICK, log=logs.append)
    assert prepared == tmp_path / QUICK.key()
    assert (tmp_path / "current").resolve() == prepared.resolve()
    for role in ("teacher", "student"):
        assert (prepared / role / "model.safetensors").exists()
        assert (prepared / role / "tokenizer.json").exists()
    train, held_out = read_prompts(prepared / "train.jsonl"), read_prompts(prepared / "eval.jsonl")
    assert (train, held_out) == QUICK.task.split(QUICK.eval_fraction)
    baseline = load_baseline(prepared)
    assert set(baseline) == {"teacher", "student"} and "avg@8" in baseline["student"]
    assert load_settings(prepared) == QUICK
    assert logs  # training progress was reported

    # Same settings: nothing is rebuilt.
    stamp = (prepared / "teacher" / "model.safetensors").stat().st_mtime_ns
    logs.clear()
    assert prepare_toy(tmp_path, QUICK, log=logs.append) == prepared
    assert not logs
    assert (prepared / "teacher" / "model.safetensors").stat().st_mtime_ns == stamp

    # Any changed setting is another key, another directory; `current` follows the newest.
    other = dataclasses.replace(QUICK, task=GraphTask(seed=1))
    assert other.key() != QUICK.key()
    second = prepare_toy(tmp_path, other, log=logs.append)
    assert second != prepared and prepared.exists()
    assert (tmp_path / "current").resolve() == second.resolve()
    assert not list(tmp_path.glob("*.building"))


def test_prepare_the_chain_task(tmp_path):
    chain = dataclasses.replace(QUICK, task=ChainTask(num_prompts=40), teacher_steps=2)
    prepared = prepare_toy(tmp_path, chain, log=lambda m: None)
    assert load_settings(prepared) == chain
    train, held_out = read_prompts(prepared / "train.jsonl"), read_prompts(prepared / "eval.jsonl")
    assert (train, held_out) == chain.task.split(chain.eval_fraction) and len(held_out) == 8
    assert load_baseline(prepared)["student"]["prompts"] == 8


def test_settings_key_is_stable_and_complete():
    assert ToySettings().key() == ToySettings().key()
    keys = {
        ToySettings().key(),
        dataclasses.replace(ToySettings(), teacher_steps=1).key(),
        dataclasses.replace(ToySettings(), seed=1).key(),
        dataclasses.replace(ToySettings(), student=SMALL).key(),
    }
    assert len(keys) == 4
    assert json.loads(json.dumps(ToySettings().as_dict()))["task"]["dimensions"] == 5


def test_a_toy_config_prepares_its_models_when_missing_then_finds_them(tmp_path):
    """model.build_toy: what a job submitted from a clean clone does (jobs/distill.py)."""
    from eopd_ray.config import load_config
    from eopd_ray.toy.prepare import ensure_toy_for_config

    root = tmp_path / "prepared"
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "jobs" / "configs" / "toy.yaml",
        [
            f"model.student_path={root}/current/student",
            f"model.teacher_path={root}/current/teacher",
            f"data.train_path={root}/current/train.jsonl",
        ],
    )
    assert cfg.model.build_toy
    logs: list[str] = []
    prepared = ensure_toy_for_config(cfg, QUICK, log=logs.append)
    assert (
        prepared == root / QUICK.key() and (root / "current" / "student" / "config.json").exists()
    )
    assert any("preparing" in m for m in logs)
    logs.clear()
    assert ensure_toy_for_config(cfg, QUICK, log=logs.append) == prepared.resolve()
    assert logs == []


def test_sigterm_while_a_job_prepares_the_toy_models_stops_cleanly(tmp_path):
    """Issue 26: `ray job stop` during the preparation printed nothing and left a `*.building`
    directory behind. Now: the documented start-up line, exit 143, nothing half-built."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, EOPD_RAY_HOME=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "jobs/distill.py", "--config", "jobs/configs/toy.yaml", "--no-progress"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    prepared = tmp_path / "runs" / "toy" / "prepared"
    deadline = time.monotonic() + 120
    while not list(prepared.glob("*.building")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert list(prepared.glob("*.building")), "the preparation never started"
    time.sleep(1.0)  # inside the training loop
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    assert "stopped during start-up (SIGTERM)" in err
    assert not list(prepared.glob("*.building"))


def test_preparation_progress_lines_come_at_least_every_30_s_with_an_estimate(monkeypatch):
    from eopd_ray.toy import prepare

    clock = [0.0]
    monkeypatch.setattr(prepare.time, "monotonic", lambda: clock[0])
    lines = []
    progress = prepare.Progress("teacher", 1000, lines.append, every_s=30.0)
    for update in range(1, 1001):
        clock[0] = update * 0.1  # 100 s in all
        progress(update, 1.0)
    assert len(lines) == 4  # at 30, 60, 90 s and at the end
    assert lines[0].startswith("  teacher: update 300/1000 (30%)") and "~70 s left" in lines[0]
    assert "update 1000/1000 (100%)" in lines[-1]


def test_a_job_prepares_with_the_threads_it_was_given(monkeypatch):
    from eopd_ray.env import JOB_CONFIG_ENV
    from eopd_ray.toy.prepare import preparation_threads

    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert preparation_threads() == (os.cpu_count() or 1)  # a terminal: every core
    monkeypatch.setenv(JOB_CONFIG_ENV, "{}")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert preparation_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert preparation_threads() == 1
