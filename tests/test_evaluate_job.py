"""jobs/evaluate.py end to end on CPU: tiny model, synthetic benchmarks, the vLLM engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


@pytest.mark.slow
def test_evaluate_writes_json_markdown_and_samples(tiny_pair, tmp_path):
    out = tmp_path / "eval"
    same = tmp_path / "same.jsonl"  # four identical problems: four independent samples
    same.write_text(
        "".join(json.dumps({"problem": "1 + 1", "answer": "2"}) + "\n" for _ in range(4))
    )
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "evaluate.py"),
        "--model",
        str(tiny_pair[0]),
        "--benchmarks",
        str(DATA / "synthetic_arith.jsonl"),
        str(DATA / "synthetic_sets.jsonl"),
        str(same),
        "--out",
        str(out),
        "eval.samples_per_problem=4",
        "eval.k=2",
        "eval.max_new_tokens=8",
        "data.max_prompt_tokens=64",
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["benchmarks"]) == {"synthetic_arith", "synthetic_sets", "same"}
    assert results["benchmarks"]["synthetic_arith"]["problems"] == 3
    assert results["benchmarks"]["synthetic_arith"]["samples"] == 4
    assert set(results["mean"]) == {"avg@2", "pass@2"}
    table = (out / "results.md").read_text()
    assert "| synthetic_sets |" in table and "| mean |" in table
    rows = [json.loads(x) for x in (out / "synthetic_arith.samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["completions"]) == 4 for r in rows)
    same_rows = [json.loads(x) for x in (out / "same.samples.jsonl").read_text().splitlines()]
    first_samples = [r["completions"][0] for r in same_rows]
    assert len(set(first_samples)) == 4, first_samples  # a seed per problem and per sample


def test_evaluate_rejects_a_bad_benchmark_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1"}\n')
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "evaluate.py"),
            "--model",
            str(tmp_path),
            "--benchmarks",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bad.jsonl, line 1: missing or empty ['answer']" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_evaluate_writes_to_a_uri_not_to_a_folder_named_s3(tiny_pair, tmp_path, s3):
    """Issue 33: `--out s3://...` wrote to ./s3:/... and exited 0; a model URI's credentials
    (`s3://KEY:SECRET@bucket/...`) were printed and saved in results.json."""
    out = s3.uri("eval/tiny")
    model = s3.upload_dir(tiny_pair[0], "models/eval-student").replace(
        "s3://", "s3://AKIAEOPD:sEcReTkEy@"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "evaluate.py"),
            "--model",
            model,
            "--benchmarks",
            str(DATA / "synthetic_arith.jsonl"),
            "--out",
            out,
            "--engine",
            "hf",
            "eval.samples_per_problem=2",
            "eval.k=1",
            "eval.max_new_tokens=4",
            "data.max_prompt_tokens=64",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, EOPD_CACHE=str(tmp_path / "cache")),  # and the S3 credentials
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "s3:").exists()
    from eopd_ray.storage.run_storage import RunStorage

    store = RunStorage(out)
    assert set(store.listdir()) == {"results.json", "results.md", "synthetic_arith.samples.jsonl"}
    assert json.loads(store.read_text("results.json"))["benchmarks"]["synthetic_arith"]
    assert f"results in {out}" in proc.stdout
    assert "sEcReTkEy" not in proc.stdout + proc.stderr + "".join(
        store.read_text(name) for name in store.listdir()
    )
    assert json.loads(store.read_text("results.json"))["model"].startswith(
        "s3://***@eopd-test/models/eval-student?endpoint_override="
    )
