"""A run that keeps everything on S3 (moto's server, spoken to over HTTP by pyarrow): models read
from the bucket, checkpoints and metrics written there, a SIGTERM, a resume from the bucket, the
HF export to it, and jobs/evaluate.py on the exported model straight from the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from eopd_ray.config import load_config
from eopd_ray.driver.pipeline import Pipeline
from eopd_ray.storage import checkpoint
from eopd_ray.storage.run_storage import RunStorage
from eopd_ray.storage.sources import kind_of

from .conftest import REPO, TINY

pytestmark = pytest.mark.slow


def config(s3, models: tuple[str, str], *extra: str):
    return load_config(
        TINY,
        [
            f"model.student_path={models[0]}",
            f"model.teacher_path={models[1]}",
            "model.build_tiny=false",
            f"run.output_dir={s3.uri('run')}",
            "run.steps=3",
            "run.checkpoint_every=1",
            "run.resume=auto",
            "run.stop_grace_s=300",  # never abandon a step inside the test process
            *extra,
        ],
    )


def run_through(pipeline: Pipeline) -> Pipeline:
    on_sigterm = signal.getsignal(signal.SIGTERM)  # the driver installs its own; put ours back
    try:
        pipeline.start()
        pipeline.run(progress="lines")
    finally:
        pipeline.shutdown()
        signal.signal(signal.SIGTERM, on_sigterm)
    return pipeline


def test_models_checkpoints_resume_export_and_evaluation_on_s3(local_ray, s3, tiny_pair, tmp_path):
    models = (
        s3.upload_dir(tiny_pair[0], "models/student"),
        s3.upload_dir(tiny_pair[1], "models/teacher"),
    )
    assert {kind_of(m) for m in models} == {"uri"}
    first = Pipeline(config(s3, models))
    step = first.step

    def step_then_sigterm(n):  # what `ray job stop` sends, while step 0 is in flight
        if n == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(n)

    first.step = step_then_sigterm
    run_through(first)
    store = RunStorage(s3.uri("run"))
    assert first.stopped_early
    assert checkpoint.latest(store).step == 0
    assert not store.exists("hf")

    second = run_through(Pipeline(config(s3, models)))
    assert second.start_step == 1 and second.cfg.run.id == first.cfg.run.id
    rows = [json.loads(line) for line in store.read_text("metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # each step once, across the stop
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
            "--model",
            s3.uri("run/hf"),
            "--benchmarks",
            bench,
            "--out",
            str(out),
            "--engine",
            "hf",
            "eval.samples_per_problem=2",
            "eval.k=2",
            "eval.max_new_tokens=8",
            "data.max_prompt_tokens=64",
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
