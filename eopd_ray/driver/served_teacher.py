"""The step's teacher scores from a running teacher application (`teacher.serve`).

    served = ServedScoring.connect(cfg, shape, student_tokenizer)   # refuses another teacher
    scores = served.score(batch, step, timeline)                    # TeacherScores, checked

With `teacher.serve` set the job starts no teacher workers (`WorkerGroups`); instead, at start-up,
it asks the application what it serves and refuses a different model pin, vocabulary, scored
vocabulary rows, a top-K below `teacher.top_k`, or other temperature semantics
(`check_served_teacher`). Each synchronous step then sends its whole batch at once (the adapter
cuts it into requests within the application's `max_request_tokens`, all in flight together);
the answers get the same run-time checks as the in-job teacher's (`check_teacher_scores`), and
their wall time counts as the teacher's: `time/teacher_s` and the timeline's `teacher-0` lane.

A replica lost mid-request is retried by the client; an application that does not answer at all
(deleted, every replica down, `run.step_timeout_s` passed) fails the step with TeacherUnavailable,
naming the step, the application and what to check. There are no teacher workers to restart.
"""

from __future__ import annotations

from typing import Any

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


class ServedScoring:
    """Teacher scores of whole batches from the application `cfg.teacher.serve`."""

    def __init__(self, cfg: Config, shape: ModelShape, teacher: ServedTeacher) -> None:
        self.cfg, self.shape, self.teacher = cfg, shape, teacher
        self.name = f"served teacher {cfg.teacher.serve!r} ({teacher.identity.model})"

    @classmethod
    def connect(cls, cfg: Config, shape: ModelShape, student_tokenizer: Any) -> ServedScoring:
        """Find the application on the connected cluster and check it serves this job's
        teacher (ServedTeacherMismatch otherwise, before any worker starts)."""
        client = TeacherClient(cfg.teacher.serve, timeout_s=cfg.run.step_timeout_s)
        teacher = ServedTeacher(cfg, client, student_tokenizer)
        check_served_teacher(
            teacher.identity, cfg, shape.vocab_rows, vocab_digest(student_tokenizer)
        )
        return cls(cfg, shape, teacher)

    def score(self, batch: RolloutBatch, step: int, timeline: Timeline | None) -> TeacherScores:
        try:
            scores, started, ended = self.teacher.timed("score", batch)
        except TeacherUnavailable as exc:
            raise TeacherUnavailable(
                f"step {step} teacher scoring: {exc}. Check that the application "
                f"teacher.serve = {self.cfg.teacher.serve!r} still runs on this Ray cluster "
                "(`serve status`; start it with jobs/serve_teacher.py) and has a live replica, "
                "then submit the job again (run.resume=auto: from its newest checkpoint)"
            ) from exc
        if timeline is not None:
            timeline.add("teacher-0", "score", started, ended)
        check_teacher_scores(scores, batch, self.shape.vocab_rows, step, self.name)
        return scores
