"""ServedScoring (eopd_ray.driver.served_teacher) against a fake application client: the served
answers are the job's teacher scores, timed into the teacher lane; a broken answer fails the
run-time checks naming the served teacher; a dead application fails the step naming the step,
`teacher.serve` and what to check. The whole path on a real Ray + Serve is
tests/e2e/test_served_teacher.py."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from test_teacher import make_cfg, ragged_batch

from eopd_ray.core.invariants import InvariantError
from eopd_ray.driver.served_teacher import ServedScoring
from eopd_ray.driver.streamed import ModelShape
from eopd_ray.roles.teacher import TeacherWorker
from eopd_ray.serving.adapter import ServedTeacher
from eopd_ray.serving.client import TeacherClient, TeacherUnavailable
from eopd_ray.serving.schema import ScoreAnswer, ScoreRequest, TeacherIdentity
from eopd_ray.telemetry.timeline import Timeline


class FakeClient:
    """Answers every request with `scores` (one request covers the batch: max_request_tokens is
    large), or raises `error`."""

    def __init__(self, identity: TeacherIdentity, scores, error: Exception | None = None):
        self._identity, self.scores, self.error = identity, scores, error

    def identity(self) -> TeacherIdentity:
        return self._identity

    def score_many(self, requests: list[ScoreRequest]) -> list[ScoreAnswer]:
        if self.error is not None:
            raise self.error
        (request,) = requests
        lengths = [len(r) for r in request.rows()[1]]
        model, temperature = self._identity.model, request.temperature
        return [ScoreAnswer.from_scores(self.scores, lengths, model, temperature)]


def test_the_fake_keeps_the_clients_signatures():
    for name in ("identity", "score_many"):
        fake = inspect.signature(getattr(FakeClient, name))
        real = inspect.signature(getattr(TeacherClient, name))
        assert list(fake.parameters) == list(real.parameters), name


@pytest.fixture(scope="module")
def scored(tiny_pair):
    """(cfg, shape, batch, the in-job teacher's scores, identity)."""
    cfg = make_cfg(tiny_pair, serve="teacher-x")
    worker = TeacherWorker(cfg, rank=0)
    batch = ragged_batch(plen=(5, 3, 4), rlen=(7, 2, 5), seed=2)
    identity = TeacherIdentity(
        model=cfg.model.teacher_path,
        vocab_rows=worker.vocab_rows,
        vocab_digest="-",
        top_k=cfg.teacher.top_k,
        dtype="float32",
        default_temperature=1.0,
        max_request_tokens=1 << 20,
        max_positions=512,
    )
    return cfg, ModelShape(worker.vocab_rows, 1e-3), batch, worker.score(batch), identity


def served(scored, scores, error=None) -> ServedScoring:
    cfg, shape, _, _, identity = scored
    return ServedScoring(cfg, shape, ServedTeacher(cfg, FakeClient(identity, scores, error)), None)


def test_served_answers_are_the_teachers_scores_timed_as_the_teacher(scored):
    _, _, batch, in_job, _ = scored
    timeline = Timeline(3, "sync")
    scores = served(scored, in_job).score(batch, 3, timeline)
    mask = batch.response_mask
    torch.testing.assert_close(scores.entropy[mask], in_job.entropy[mask])
    torch.testing.assert_close(scores.topk_logprobs[mask], in_job.topk_logprobs[mask])
    assert timeline.workers("teacher") == ["teacher-0"]
    assert timeline.busy_s("teacher-0") >= 0


def test_a_broken_served_answer_fails_the_run_time_checks(scored):
    _, _, batch, in_job, _ = scored
    broken = dataclasses.replace(in_job, entropy=in_job.entropy.clone())
    broken.entropy[0, 1] = float("nan")
    with pytest.raises(InvariantError) as exc:
        served(scored, broken).score(batch, 3, None)
    assert "non-finite entropy" in str(exc.value) and "teacher-x" in str(exc.value)


def test_a_dead_application_fails_the_step_saying_what_to_check(scored):
    _, _, batch, in_job, _ = scored
    gone = TeacherUnavailable("teacher application 'teacher-x' did not answer within 600 s")
    with pytest.raises(TeacherUnavailable) as exc:
        served(scored, in_job, gone).score(batch, 3, None)
    message = str(exc.value)
    assert message.startswith("step 3 teacher scoring: teacher application 'teacher-x'")
    assert "teacher.serve = 'teacher-x'" in message and "serve status" in message


def test_a_served_teacher_job_places_no_teacher_workers(tiny_pair):
    from eopd_ray.driver.actors import _bundles, worker_roles

    own = make_cfg(tiny_pair)
    shared = make_cfg(tiny_pair, serve="teacher-x")
    assert [role for role, _ in worker_roles(own)] == ["rollout", "teacher", "learner"]
    assert [role for role, _ in worker_roles(shared)] == ["rollout", "learner"]
    roles = [role for role, _ in _bundles(shared)]
    assert "teacher" not in roles and len(roles) == len(_bundles(own)) - own.teacher.num_workers
