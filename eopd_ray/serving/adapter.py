"""ServedTeacher: the calls the driver makes on its teacher workers, answered by a served teacher.

    teacher = ServedTeacher(cfg, TeacherClient("teacher"))
    check_served_teacher(teacher.identity, cfg, vocab_rows, vocab_digest(student_tokenizer))
    scores = teacher.score(batch)                      # RolloutBatch -> TeacherScores, as before
    scores, started, ended = teacher.timed("score", batch)

What the in-job TeacherWorker does before its forward happens here, on the job's side, with the
same functions: the student's EOS mapped to the teacher's (`teacher_responses`), and, when the
two prompt templates differ, the student's prompt decoded to text for the teacher to render with
`data.teacher_template` (the worker's `_teacher_prompts`). The rows go out in requests of at most
the application's `max_request_tokens`, all at once, and the answers come back as one padded
TeacherScores cut to `teacher.top_k` (the served top-K is sorted, so its first K are the top K).
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from eopd_ray.config import Config
from eopd_ray.core.forward import rows_of
from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.errors import EopdError
from eopd_ray.roles.teacher import merged_ids_of, teacher_responses
from eopd_ray.serving.client import split_rows
from eopd_ray.serving.schema import (
    TEMPERATURE_SEMANTICS,
    ScoreAnswer,
    ScoreRequest,
    TeacherIdentity,
)
from eopd_ray.storage.sources import kind_of


class Client(Protocol):
    def identity(self) -> TeacherIdentity: ...
    def score_many(self, requests: list[ScoreRequest]) -> list[ScoreAnswer]: ...


class ServedTeacherMismatch(EopdError):
    """The served teacher is not the configured one: its scores would train the wrong target."""


def same_model(served: str, configured: str) -> bool:
    """The same pinned spec, or the same local directory however each side wrote it (the
    application makes its local paths absolute; a job may give a relative one)."""
    if served == configured:
        return True
    local = kind_of(served) == "local" and kind_of(configured) == "local"
    return local and os.path.abspath(served) == os.path.abspath(configured)


def check_served_teacher(
    identity: TeacherIdentity, cfg: Config, vocab_rows: int, student_vocab_digest: str
) -> None:
    """Refuse a served teacher that differs from the job's: model (pinned spec), vocabulary
    (the student's tokenizer, and the rows scored over), top-K, temperature semantics."""
    problems = []
    if not same_model(identity.model, cfg.model.teacher_path):
        problems.append(
            f"it serves {identity.model!r}, model.teacher_path is {cfg.model.teacher_path!r}"
        )
    if identity.vocab_digest != student_vocab_digest:
        problems.append(
            f"its tokenizer's vocabulary differs from model.student_path's "
            f"({identity.vocab_digest[:12]} vs {student_vocab_digest[:12]})"
        )
    if identity.vocab_rows != vocab_rows:
        problems.append(
            f"it scores over {identity.vocab_rows} ids, this job over {vocab_rows} (the smaller "
            "of the two models' embedding rows)"
        )
    if identity.top_k < cfg.teacher.top_k:
        problems.append(f"its top-K is {identity.top_k} < teacher.top_k = {cfg.teacher.top_k}")
    if identity.temperature_semantics != TEMPERATURE_SEMANTICS:
        problems.append(
            f"its temperature semantics are {identity.temperature_semantics!r}, this job's "
            f"{TEMPERATURE_SEMANTICS!r}"
        )
    if problems:
        app = f"teacher.serve = {cfg.teacher.serve!r}" if cfg.teacher.serve else "the application"
        raise ServedTeacherMismatch(
            f"the served teacher ({app}) is not this job's teacher: "
            + "; ".join(problems)
            + ". Serve the configured teacher (config=<this job's YAML>) or point teacher.serve "
            "at the application that serves it"
        )


class ServedTeacher:
    """Stands where one teacher worker stands: `score(batch)`, `timed("score", batch)`."""

    ROLE = "teacher"

    def __init__(self, cfg: Config, client: Client, student_tokenizer: Any = None) -> None:
        self.cfg, self.client = cfg, client
        self.identity = client.identity()
        self.merged_ids = merged_ids_of(cfg)
        self._student_tokenizer = student_tokenizer  # loaded when first needed (templates differ)

    def requests(self, batch: RolloutBatch) -> list[tuple[list[int], ScoreRequest]]:
        """(rows, request) pairs covering the batch within the application's token limit."""
        d = self.cfg.data
        prompts = rows_of(batch.prompt_ids, batch.prompt_mask)
        responses = teacher_responses(batch, self.cfg)
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        texts = None
        if d.teacher_template != d.student_template:
            # As TeacherWorker._teacher_prompts: the student's raw prompt, re-rendered by the
            # teacher with its own template (the lengths above are the student's: close enough
            # to split by; the application refuses a request that ends up over its limit).
            texts = self._student_tok().batch_decode(prompts)
        out = []
        for rows in split_rows(lengths, self.identity.max_request_tokens):
            common = {
                "temperature": self.cfg.rollout.temperature,
                "merged_ids": self.merged_ids,
                "model": self.identity.model,
            }
            if texts is None:
                request = ScoreRequest.from_rows(
                    [prompts[r] for r in rows], [responses[r] for r in rows], **common
                )
            else:
                request = ScoreRequest.from_texts(
                    [texts[r] for r in rows],
                    d.teacher_template,
                    [responses[r] for r in rows],
                    **common,
                )
            out.append((rows, request))
        return out

    def score(self, batch: RolloutBatch) -> TeacherScores:
        planned = self.requests(batch)
        answers = self.client.score_many([request for _, request in planned])
        scores = ScoreAnswer.concat(answers).to_scores(
            num_positions=batch.response_ids.shape[1], top_k=self.cfg.teacher.top_k
        )
        scores.check_matches(batch)
        return scores

    def timed(self, method: str, *args: Any) -> tuple[Any, float, float]:
        """(self.method(*args), wall-clock start, end), as the workers' `timed`."""
        started = time.time()
        result = getattr(self, method)(*args)
        return result, started, time.time()

    def _student_tok(self) -> Any:
        if self._student_tokenizer is None:
            from transformers import AutoTokenizer

            m = self.cfg.model
            self._student_tokenizer = AutoTokenizer.from_pretrained(
                m.student_path, trust_remote_code=m.trust_remote_code
            )
        return self._student_tokenizer
