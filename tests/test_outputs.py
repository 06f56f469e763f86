"""eopd_ray/storage/outputs.py and the jobs' output options: a path or a URI, never a local
folder named `s3:` (issue 33). Against a real S3 endpoint (moto's server, tests/s3_endpoint.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from eopd_ray.storage.outputs import local_output_dir, output_dir, write_output
from eopd_ray.storage.run_storage import RunStorage, StorageError

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def job(name: str):
    """A script of jobs/ as a module (its main() called in this process)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_file_goes_to_a_path_or_a_uri_with_its_query_kept(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shown = write_output(s3.uri("bench/out.json"), '{"a": 1}', "--out")
    assert shown == s3.uri("bench/out.json")
    assert RunStorage(s3.uri("bench")).read_text("out.json") == '{"a": 1}'
    assert write_output("rel/out.json", b"x", "--out") == str(tmp_path / "rel" / "out.json")
    assert (tmp_path / "rel" / "out.json").read_bytes() == b"x"
    assert not (tmp_path / "s3:").exists()


def test_a_uri_that_cannot_be_opened_fails_at_once_naming_the_option():
    with pytest.raises(StorageError, match=r"^--out = 'nope://bucket/x': cannot open it"):
        output_dir("nope://bucket/x", "--out")


def test_an_option_that_must_be_local_refuses_a_uri_clearly(tmp_path):
    assert local_output_dir(str(tmp_path), "--root", "the toy cache") == tmp_path
    with pytest.raises(StorageError) as caught:
        local_output_dir("s3://KEY:SECRET@bucket/toy?scheme=http", "--root", "the toy cache")
    assert "--root 's3://***@bucket/toy?scheme=http' is a URI, but the toy cache must be" in str(
        caught.value
    )


def test_plot_metrics_reads_and_writes_uris(s3, tmp_path, capsys):
    from eopd_ray.telemetry.timeline import Timeline

    run = RunStorage(s3.uri("runs/plotted"))
    run.write_text(
        "metrics.jsonl", '{"step": 0, "loss/total": 1.0}\n{"step": 1, "loss/total": 0.5}\n'
    )
    run.write_text(
        "timeline.json", Timeline(1, "sync", 0.0, [("rollout-0", "rollout", 0.0, 1.0)]).to_json()
    )
    plot_metrics = job("plot_metrics")
    assert plot_metrics.main([s3.uri("runs/plotted/metrics.jsonl")]) == 0
    assert {"overview.png", "loss.png", "timeline.png"} <= set(run.listdir("plots"))
    assert plot_metrics.main([s3.uri("runs/plotted/metrics.jsonl"), "--out", s3.uri("p2")]) == 0
    assert "overview.png" in RunStorage(s3.uri("p2")).listdir()
    printed = capsys.readouterr().out
    assert s3.uri("p2/overview.png") in printed and s3.uri("runs/plotted/plots/loss.png") in printed


def test_toy_report_reads_and_writes_a_uri_run_dir(s3, tmp_path, tiny_pair, monkeypatch, capsys):
    """The held-out evaluation itself is replaced (tests/toy/ test it): what is checked is where
    the report reads the run from and writes to."""
    prepared = tmp_path / "prepared" / "current"
    prepared.mkdir(parents=True)
    run = RunStorage(s3.uri("runs/toy"))
    s3.upload_dir(tiny_pair[0], "runs/toy/hf")
    run.write_text("metrics.jsonl", json.dumps({"step": 0, "kl/reverse_sampled": 1.0}) + "\n")
    seen = {}

    def evaluate_toy(model_dir, *args, **kwargs):
        seen["model"] = Path(model_dir)
        return {"prompts": 2.0, "avg@8": 0.5}

    monkeypatch.setattr("eopd_ray.toy.evaluate.evaluate_toy", evaluate_toy)
    monkeypatch.setattr("eopd_ray.toy.prepare.load_settings", lambda _: _Settings())
    monkeypatch.setattr(
        "eopd_ray.toy.prepare.load_baseline", lambda _: {"teacher": {}, "student": {}}
    )
    monkeypatch.setattr("eopd_ray.toy.prepare.read_prompts", lambda _: ["p"])
    overrides = [
        f"model.student_path={prepared}/student",
        f"model.teacher_path={prepared}/teacher",
        f"data.train_path={prepared}/train.jsonl",
        f"run.output_dir={s3.uri('runs/toy')}",
    ]
    assert job("toy_report").main(["--config", str(JOBS / "configs" / "toy.yaml"), *overrides]) == 0
    assert (seen["model"] / "config.json").exists()  # the exported student, downloaded
    assert {"report.md", "eval.json", "plots"} <= set(run.listdir())
    assert "![overview](plots/overview.png)" in run.read_text("report.md")
    assert f"report: {s3.uri('runs/toy/report.md')}" in capsys.readouterr().out


class _Settings:
    task = None
    eval_samples = 8


def test_jobs_that_build_models_in_place_refuse_a_uri(capsys):
    for name, args in (
        ("prepare_toy", ["--root", "s3://bucket/toy"]),
        ("prepare_rehearsal", ["--root", "s3://bucket/assets"]),
    ):
        with pytest.raises(SystemExit) as caught:
            job(name).main(args)
        assert caught.value.code == 2
        assert "--root 's3://bucket/" in capsys.readouterr().err
