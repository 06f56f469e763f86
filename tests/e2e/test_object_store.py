"""A run that keeps everything on S3 (moto's server, spoken to over HTTP by pyarrow) and is
preempted: models read from the bucket, checkpoints and metrics written there, a SIGTERM while a
step far longer than `run.stop_grace_s` is in flight (the driver, a process of its own with its
embedded Ray, must be gone within the grace period, say where the next run resumes and leave no
Ray process behind), the resume from the bucket, the HF export to it, and jobs/evaluate.py on
the exported model straight from the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from eopd_ray.config import load_config
from eopd_ray.driver.pipeline import Pipeline
from eopd_ray.storage import checkpoint
from eopd_ray.storage.run_storage import RunStorage
from eopd_ray.storage.sources import kind_of

from .conftest import REPO, TINY

pytestmark = pytest.mark.slow

SLOW_AT = 1
GRACE_S = 8.0

# jobs/distill.py with one seam: step SLOW_AT's training takes far longer than the grace period.
DRIVER = """
import pathlib, runpy, sys, time
from eopd_ray.env import set_job_environment
set_job_environment()
from eopd_ray.driver.pipeline import Pipeline

flag, slow_at, script, *args = sys.argv[1:]
train = Pipeline._train

def _train(self, batch, scores, step, *rest):
    if step == int(slow_at):
        pathlib.Path(flag).write_text("training")
        time.sleep(600)
    return train(self, batch, scores, step, *rest)

Pipeline._train = _train
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


def overrides(s3, models: tuple[str, str], *extra: str) -> list[str]:
    return [
        f"model.student_path={models[0]}",
        f"model.teacher_path={models[1]}",
        "model.build_tiny=false",
        f"run.output_dir={s3.uri('run')}",
        "run.steps=3",
        "run.checkpoint_every=1",
        "run.resume=auto",
        *extra,
    ]


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


def preempt_during_the_slow_step(args: list[str], flag) -> tuple[int, str, float, int]:
    """jobs/distill.py in its own process group, SIGTERM once the slow step is in flight.
    Returns (exit code, stderr, seconds from SIGTERM to exit, the process group)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [
            *(sys.executable, "-c", DRIVER, str(flag), str(SLOW_AT)),
            *(str(REPO / "jobs" / "distill.py"), "--no-progress", "--config", str(TINY)),
            *args,
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
        return driver.returncode, stderr, time.monotonic() - signalled, driver.pid
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)


def test_a_preempted_run_on_s3_resumes_exports_and_evaluates_from_s3(
    s3, local_ray, tiny_pair, tmp_path
):
    models = (
        s3.upload_dir(tiny_pair[0], "models/student"),
        s3.upload_dir(tiny_pair[1], "models/teacher"),
    )
    assert {kind_of(m) for m in models} == {"uri"}
    code, stderr, took, pgid = preempt_during_the_slow_step(
        overrides(s3, models, f"run.stop_grace_s={GRACE_S}", "run.export_hf=false"),
        tmp_path / "slow-step-started",
    )
    assert code == 143, stderr[-3000:]
    assert took <= GRACE_S, f"the driver took {took:.1f}s to go, run.stop_grace_s = {GRACE_S}"
    assert f"step {SLOW_AT} could not finish and checkpoint within run.stop_grace_s" in stderr
    assert f"resumes at step {SLOW_AT} from s3://" in stderr, stderr[-2000:]
    store = RunStorage(s3.uri("run"))
    assert [k.step for k in checkpoint.complete_checkpoints(store)] == [SLOW_AT - 1]
    assert not store.exists("owner.json")  # the abandoned driver removed its claim
    deadline = time.monotonic() + 20
    while alive_in_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive_in_group(pgid) == []  # the embedded Ray went with the driver

    on_sigterm = signal.getsignal(signal.SIGTERM)  # the driver installs its own; put ours back
    # The resumed run uploads its periodic checkpoint (step 1) beside step 2.
    resumed = Pipeline(load_config(TINY, overrides(s3, models, "run.checkpoint_upload=background")))
    try:
        resumed.start()
        resumed.run(progress="lines")
    finally:
        resumed.shutdown()
        signal.signal(signal.SIGTERM, on_sigterm)
    assert resumed.start_step == SLOW_AT
    rows = [json.loads(line) for line in store.read_text("metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # each step once, across the preemption
    assert [k.step for k in checkpoint.complete_checkpoints(store)] == [1, 2]
    exported = s3.keys("run/hf")
    assert "config.json" in exported and any(k.endswith(".safetensors") for k in exported)
    assert not [k for k in exported if k.startswith(".")]  # no cache bookkeeping copied along

    bench = s3.put_bytes(
        "data/arith.jsonl",
        b"".join(
            json.dumps({"problem": f"{a} + {a}", "answer": str(2 * a)}).encode() + b"\n"
            for a in range(3)
        ),
    )
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "evaluate.py"),
            *("--model", s3.uri("run/hf"), "--benchmarks", bench, "--out", str(out)),
            *("--engine", "hf", "eval.samples_per_problem=2", "eval.k=2"),
            *("eval.max_new_tokens=8", "data.max_prompt_tokens=64"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "EOPD_CACHE": str(tmp_path / "eval-cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["benchmarks"]["arith"]["problems"] == 3
    assert results["model"] == s3.uri("run/hf")
    assert "testing" not in proc.stdout + proc.stderr  # credentials never printed


def test_credentials_in_a_uri_are_never_shown_or_saved(s3, local_ray, tiny_pair, caplog, capsys):
    """Issue 33: `s3://KEY:SECRET@bucket/...` (the form pyarrow accepts) was printed by the
    driver and saved. Now: masked in the logs, config.yaml, the checkpoints' configs, the metrics
    and their tags, absent from the workers' runtime env; the resume (which reads the masked
    config) continues the run with the credentials it is given."""
    import logging

    import ray

    from eopd_ray.telemetry.ray_gauges import RayMetricsSink

    def with_key(uri: str) -> str:
        return uri.replace("s3://", "s3://AKIAEOPD:sEcReTkEy@")

    models = (str(tiny_pair[0]), with_key(s3.upload_dir(tiny_pair[1], "models/teacher-creds")))
    args = [
        *overrides(s3, models, "run.export_hf=false"),
        f"run.output_dir={with_key(s3.uri('creds-run'))}",
    ]
    on_sigterm = signal.getsignal(signal.SIGTERM)
    caplog.set_level(logging.INFO)
    envs = []
    for steps in (2, 3):  # then resumed
        p = Pipeline(load_config(TINY, [*args, f"run.steps={steps}"]))
        try:
            p.start()
            p.run(progress="lines")
            for group in (p.rollout, p.teacher, p.learner):
                call = group.handles[0].__ray_call__.remote(
                    lambda _: ray.get_runtime_context().runtime_env
                )
                envs.append(json.dumps(ray.get(call, timeout=60)))
            tags = json.dumps(RayMetricsSink(p.cfg.run.name, p.cfg.run.id).tags)
        finally:
            p.shutdown()
            signal.signal(signal.SIGTERM, on_sigterm)
    assert p.start_step == 2
    store = RunStorage(s3.uri("creds-run"))
    rows = [json.loads(line) for line in store.read_text("metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    files = {name: store.read_text(name) for name in ("config.yaml", "metrics.jsonl")}
    for ckpt in checkpoint.complete_checkpoints(store):
        files[ckpt.rel] = store.read_text(f"{ckpt.rel}/config.yaml")
    assert "s3://***@eopd-test/creds-run?endpoint_override=" in files["config.yaml"]
    shown = [caplog.text, *capsys.readouterr(), *files.values(), *envs, tags]
    leaked = [text[:200] for text in shown if "AKIAEOPD" in text or "sEcReTkEy" in text]
    assert not leaked, leaked
    assert "outputs in s3://***@eopd-test/creds-run" in caplog.text
