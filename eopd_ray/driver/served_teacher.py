"""The step's teacher scores from a running teacher application (`teacher.serve`).

    served = ServedScoring.connect(cfg, shape, student_tokenizer)   # refuses another teacher
    scores = served.score(batch, step, timeline)                    # TeacherScores, checked
    ref = served.score_async(group)                                 # the streamed step's form
    scores, started, ended = served.scored(ref, step)

With `teacher.serve` set the job starts no teacher workers (`WorkerGroups`); instead, at start-up,
it asks the application what it serves and refuses a different model pin, vocabulary, scored
vocabulary rows, a top-K below `teacher.top_k`, or other temperature semantics
(`check_served_teacher`). Each synchronous step then sends its whole batch at once (the adapter
cuts it into requests within the application's `max_request_tokens`, all in flight together);
the answers get the same run-time checks as the in-job teacher's (`check_teacher_scores`), and
their wall time counts as the teacher's: `time/teacher_s` and the timeline's `teacher-0` lane.
The streamed step (`StepStream`) sends each group as it finishes with `score_async`: a Ray task
(no CPU reserved) that asks the application and returns what a teacher worker's
`timed("score", group)` returns, an ObjectRef the stream waits on beside its other calls.

A replica lost mid-request is retried by the client; an application that does not answer at all
(deleted, every replica down, `run.step_timeout_s` passed) fails the step with TeacherUnavailable,
naming the step, the application and what to check. There are no teacher workers to restart.
"""

from __future__ import annotations

from typing import Any

import ray

from eopd_ray.config import Config
from eopd_ray.core.invariants import check_teacher_scores
from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.driver.streamed import ModelShape
from eopd_ray.serving.adapter import ServedTeacher, check_served_teacher
from eopd_ray.serving.client import TeacherClient, TeacherUnavailable
from eopd_ray.serving.schema import vocab_digest
from eopd_ray.telemetry.timeline import Timeline


def load_student_tokenizer(local: Config) -> Any:
    """The student's tokenizer from this node's copy (`with_local_paths`): its vocabulary is
    what the served teacher's must equal."""
    from transformers import AutoTokenizer

    m = local.model
    return AutoTokenizer.from_pretrained(m.student_path, trust_remote_code=m.trust_remote_code)


# Per Ray worker process running `_score_group`: one client per job config (the requests depend
# on its templates, temperature, EOS mapping and top-K), made on its first group, so each later
# group costs one round trip to the application.
_TEACHERS: dict[str, ServedTeacher] = {}


def _served_teacher(cfg: Config, student_tokenizer: Any) -> ServedTeacher:
    key = repr(cfg)
    if key not in _TEACHERS:
        client = TeacherClient(cfg.teacher.serve, timeout_s=cfg.run.step_timeout_s)
        _TEACHERS[key] = ServedTeacher(cfg, client, student_tokenizer)
    return _TEACHERS[key]


@ray.remote(num_cpus=0)
def _score_group(cfg: Config, batch: RolloutBatch, student_tokenizer: Any) -> tuple:
    """(scores, wall-clock start, end) of one streamed group, as a teacher worker's `timed`."""
    return _served_teacher(cfg, student_tokenizer).timed("score", batch)


class ServedScoring:
    """Teacher scores of whole batches, or of streamed groups, from the application
    `cfg.teacher.serve`."""

    def __init__(
        self, cfg: Config, shape: ModelShape, teacher: ServedTeacher, student_tokenizer: Any
    ) -> None:
        self.cfg, self.shape, self.teacher = cfg, shape, teacher
        self.student_tokenizer = student_tokenizer
        self.name = f"served teacher {cfg.teacher.serve!r} ({teacher.identity.model})"
        self._task_args: tuple | None = None  # (cfg, tokenizer) in the object store, put once

    @classmethod
    def connect(cls, cfg: Config, shape: ModelShape, student_tokenizer: Any) -> ServedScoring:
        """Find the application on the connected cluster and check it serves this job's
        teacher (ServedTeacherMismatch otherwise, before any worker starts)."""
        client = TeacherClient(cfg.teacher.serve, timeout_s=cfg.run.step_timeout_s)
        teacher = ServedTeacher(cfg, client, student_tokenizer)
        check_served_teacher(
            teacher.identity, cfg, shape.vocab_rows, vocab_digest(student_tokenizer)
        )
        return cls(cfg, shape, teacher, student_tokenizer)

    def score(self, batch: RolloutBatch, step: int, timeline: Timeline | None) -> TeacherScores:
        try:
            scores, started, ended = self.teacher.timed("score", batch)
        except TeacherUnavailable as exc:
            raise self._unavailable(step, exc) from exc
        if timeline is not None:
            timeline.add("teacher-0", "score", started, ended)
        check_teacher_scores(scores, batch, self.shape.vocab_rows, step, self.name)
        return scores

    def score_async(self, batch: RolloutBatch) -> ray.ObjectRef:
        """One streamed group to the application; `scored(ref, step)` reads the answer."""
        if self._task_args is None:
            d = self.cfg.data
            # The student's tokenizer travels only when the teacher re-renders its prompts.
            needed = d.teacher_template != d.student_template
            tokenizer = self.student_tokenizer if needed else None
            self._task_args = (ray.put(self.cfg), ray.put(tokenizer))
        cfg_ref, tokenizer_ref = self._task_args
        return _score_group.remote(cfg_ref, batch, tokenizer_ref)

    def scored(self, ref: ray.ObjectRef, step: int) -> tuple[TeacherScores, float, float]:
        """(scores, start, end) of a `score_async` call; TeacherUnavailable when the
        application did not answer (the task retried a lost replica already)."""
        try:
            return ray.get(ref)
        except TeacherUnavailable as exc:  # Ray's task error is also the task's exception
            raise self._unavailable(step, getattr(exc, "cause", None) or exc) from exc
        except ray.exceptions.RayError as exc:
            if isinstance(exc, ray.exceptions.RayTaskError):
                raise
            raise self._unavailable(step, exc) from exc  # the calling task's worker died

    def _unavailable(self, step: int, exc: Exception) -> TeacherUnavailable:
        return TeacherUnavailable(
            f"step {step} teacher scoring: {exc}. Check that the application "
            f"teacher.serve = {self.cfg.teacher.serve!r} still runs on this Ray cluster "
            "(`serve status`; start it with jobs/serve_teacher.py) and has a live replica, "
            "then submit the job again (run.resume=auto: from its newest checkpoint)"
        )
