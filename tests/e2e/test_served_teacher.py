"""Two distillation runs at once scored by one served teacher (`teacher.serve`) on a real local
Ray + Serve, one synchronous and one streamed (its groups sent as they finish): both finish each
step once, no teacher worker starts, the served scores equal the in-job teacher's; a job whose
teacher differs from the served one, or that names no running application, is refused at
start-up before its run directory is touched."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from eopd_ray.config import load_config
from eopd_ray.driver.pipeline import Pipeline
from eopd_ray.ports import free_port
from eopd_ray.roles.teacher import TeacherWorker
from eopd_ray.serving.adapter import ServedTeacherMismatch
from eopd_ray.serving.client import TeacherUnavailable
from eopd_ray.telemetry.step_metrics import read_jsonl

from .conftest import TINY, tiny_overrides

pytestmark = pytest.mark.slow

APP = "eopd-e2e-teacher"
# Few workers per job (0.5 CPU each): the two jobs and the replica fit local_ray's 4 CPUs.
SMALL = [
    "rollout.num_workers=1",
    "learner.num_workers=1",
    "run.steps=2",
]


@pytest.fixture(scope="module")
def served_app(local_ray, tiny_pair, tmp_path_factory):
    """One replica of the tiny teacher, served as APP for the module's jobs."""
    from ray import serve

    from eopd_ray.serving.app import ServeSettings, serve_teacher

    out = tmp_path_factory.mktemp("served")
    cfg = load_config(TINY, tiny_overrides(tiny_pair, out, *SMALL))
    settings = ServeSettings(name=APP, route_prefix="/e2e-teacher", http_port=free_port())
    serve_teacher(settings, cfg)
    try:
        yield cfg
    finally:
        serve.shutdown()


def job_config(tiny_pair, out, *extra):
    return load_config(TINY, tiny_overrides(tiny_pair, out, *SMALL, f"teacher.serve={APP}", *extra))


def test_one_served_teacher_scores_two_jobs_at_once(served_app, tiny_pair, tmp_path):
    # Job 1 streams from two rollout workers: at least two groups a step, each scored on arrival.
    pipelines = [
        Pipeline(job_config(tiny_pair, tmp_path / f"run{i}", *extra))
        for i, extra in enumerate(
            (["rollout.stream=false"], ["rollout.stream=true", "rollout.num_workers=2"])
        )
    ]
    histories: dict[int, list[dict]] = {}
    errors: list[BaseException] = []
    spans: dict[int, tuple[float, float]] = {}  # each run's (start, end)

    def run(i: int) -> None:
        started = time.monotonic()
        try:
            histories[i] = pipelines[i].run(progress="lines")
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)
        spans[i] = (started, time.monotonic())

    try:
        for p in pipelines:  # start() installs signal handlers: in the main thread
            p.start()
            assert p.teacher is None  # no teacher worker of the job's own
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values())  # at once
        # Each job: steps 0 and 1, once each, the served teacher's time counted as the teacher's.
        for i in range(2):
            metrics_file = tmp_path / f"run{i}" / "metrics.jsonl"
            assert [r["step"] for r in read_jsonl(metrics_file)] == [0, 1]
            assert len(histories[i]) == 2
            for metrics in histories[i]:
                assert metrics["time/teacher_s"] > 0
                assert metrics["roles/teacher_busy_s"] > 0
                if i == 0:  # streamed: scoring overlaps the rollout, time/teacher_s is the rest
                    assert metrics["roles/teacher_busy_s"] <= metrics["time/teacher_s"] + 1e-3
                assert metrics["teacher/tokens_per_s"] > 0
        assert all(h["stream/groups"] >= 2 for h in histories[1])  # scored as they came
        # The served scores of a fresh batch equal the in-job teacher's on the same batch.
        p = pipelines[0]
        batch = p.rollouts.collect(p.rollouts.launch(2))
        served = p._score(batch, 2)
    finally:
        for p in pipelines:
            p.shutdown()
    in_job = TeacherWorker(served_app, rank=0).score(batch)
    for name in ("token_logprobs", "entropy", "topk_logprobs"):
        torch.testing.assert_close(getattr(served, name), getattr(in_job, name), atol=1e-5, rtol=0)
    agree = (served.topk_ids == in_job.topk_ids).float().mean()
    assert agree > 0.99, agree  # a near-tie may swap two ids


def test_a_job_whose_teacher_is_not_the_served_one_is_refused(served_app, tiny_pair, tmp_path):
    """The student as teacher: another model than the one served (and other vocabulary rows)."""
    student = tiny_pair[0]
    cfg = job_config((student, student), tmp_path / "run")
    pipeline = Pipeline(cfg)
    try:
        with pytest.raises(ServedTeacherMismatch) as exc:
            pipeline.start()
    finally:
        pipeline.shutdown()
    message = str(exc.value)
    assert "model.teacher_path" in message and str(tiny_pair[1]) in message
    assert f"teacher.serve = '{APP}'" in message
    assert pipeline.groups is None and not (tmp_path / "run" / "config.yaml").exists()


def test_a_job_naming_no_running_application_is_refused(served_app, tiny_pair, tmp_path):
    cfg = job_config(tiny_pair, tmp_path / "run", "teacher.serve=no-such-teacher")
    pipeline = Pipeline(cfg)
    try:
        with pytest.raises(TeacherUnavailable, match=r"no-such-teacher.*teacher\.serve"):
            pipeline.start()
    finally:
        pipeline.shutdown()


def test_an_application_deleted_mid_run_stops_the_job_naming_the_step(
    served_app, tiny_pair, tmp_path
):
    """Last in the module: it deletes the application. A streamed job (its groups scored by Ray
    tasks through the application) whose teacher is deleted after step 0 stops at step 1 with
    TeacherUnavailable saying what to check, step 0's metrics kept; a client of the deleted
    application (the synchronous path's) gets TeacherUnavailable too, not Serve's bare error."""
    from ray import serve

    from eopd_ray.serving.client import TeacherClient

    out = tmp_path / "run"
    pipeline = Pipeline(job_config(tiny_pair, out, "rollout.stream=true"))
    step = pipeline.step

    def deleting_before_step_1(n):
        if n == 1:
            serve.delete(APP)
        return step(n)

    pipeline.step = deleting_before_step_1
    try:
        pipeline.start()
        client = TeacherClient(APP, timeout_s=30, retries=1)  # before the application goes
        with pytest.raises(TeacherUnavailable) as exc:
            pipeline.run(progress="lines")
    finally:
        pipeline.shutdown()
    message = str(exc.value)
    assert "step 1 teacher scoring" in message and f"teacher.serve = '{APP}'" in message
    assert "no longer deployed" in message and "run.resume=auto" in message
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0]
    with pytest.raises(TeacherUnavailable, match="no longer deployed"):
        client.identity()
