"""The served teacher's wire schema (no Ray): both encodings round-trip, the binary one is the
smaller, malformed requests name their field, rows split within the token limit, and the
driver-side identity check refuses another teacher."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from eopd_ray.config import config_from_dict
from eopd_ray.core.wire import TeacherScores
from eopd_ray.errors import EopdError
from eopd_ray.serving.adapter import ServedTeacherMismatch, check_served_teacher
from eopd_ray.serving.client import split_rows
from eopd_ray.serving.codec import (
    answer_from_json,
    answer_to_json,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
    request_from_json,
    request_to_json,
)
from eopd_ray.serving.schema import RequestError, ScoreAnswer, ScoreRequest, TeacherIdentity

PROMPTS, RESPONSES = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]


def random_scores(lengths, k=4, seed=0) -> TeacherScores:
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    top = -torch.rand(b, t, k, generator=g).sort(-1).values.flip(-1) * 3
    return TeacherScores(
        token_logprobs=-torch.rand(b, t, generator=g) * mask,
        entropy=torch.rand(b, t, generator=g) * mask,
        topk_ids=torch.randint(0, 300, (b, t, k), generator=g, dtype=torch.int32) * mask[..., None],
        topk_logprobs=top * mask[..., None],
    )


def test_requests_round_trip_in_both_encodings():
    for request in (
        ScoreRequest.from_rows(PROMPTS, RESPONSES, temperature=0.7, merged_ids=(2, 3)),
        ScoreRequest.from_texts(["a b", "c"], "chat", RESPONSES, model="org/x@abc"),
    ):
        for back in (
            decode_request(encode_request(request)),
            request_from_json(json.loads(json.dumps(request_to_json(request)))),
        ):
            assert request_to_json(back) == request_to_json(request)
    assert ScoreRequest.from_rows(PROMPTS, RESPONSES).rows() == (PROMPTS, RESPONSES)


def test_answers_round_trip_and_the_binary_one_is_smaller():
    lengths = [3, 1, 5]
    scores = random_scores(lengths)
    answer = ScoreAnswer.from_scores(scores, lengths, "org/teacher@abc", 1.0)
    for back in (
        decode_answer(encode_answer(answer)),
        answer_from_json(json.loads(json.dumps(answer_to_json(answer)))),
    ):
        again = back.to_scores(5)
        for name in ("token_logprobs", "entropy", "topk_ids", "topk_logprobs"):
            assert torch.equal(getattr(again, name), getattr(scores, name)), name
        assert back.model == "org/teacher@abc"
    assert len(encode_answer(answer)) < len(json.dumps(answer_to_json(answer)))
    # The first K of a sorted top-K are the top K: a job with a smaller teacher.top_k.
    assert torch.equal(answer.to_scores(top_k=2).topk_logprobs, scores.topk_logprobs[..., :2])
    parts = ScoreAnswer.concat([answer, answer])
    assert parts.lengths == lengths * 2


BAD = [
    ({"contexts": [[1, 2]], "response_starts": [1], "extra": 1}, "extra"),
    ({"contexts": [[1, 2]], "response_starts": [2, 1]}, "response_starts"),
    ({"contexts": [[1, 2]], "response_starts": [3]}, "response_starts"),
    ({"contexts": [[1, -2]], "response_starts": [1]}, "context_ids"),
    ({"contexts": [[1.5, 2]], "response_starts": [1]}, "contexts"),
    ({"contexts": [[1, 2]], "response_starts": [1], "temperature": "hot"}, "temperature"),
    ({"contexts": [[1, 2]], "response_starts": [1], "temperature": -1}, "temperature"),
    ({"contexts": [[1, 2]], "response_starts": [1], "merged_ids": [2, 2]}, "merged_ids"),
    ({"contexts": [[1, 2]], "response_starts": [1], "responses": [[3]]}, "response_ids"),
    ({"prompt_texts": ["a"], "template": "custom", "responses": [[3]]}, "template"),
    ({"prompt_texts": ["a", "b"], "template": "raw", "responses": [[3]]}, "response_offsets"),
    ({"response_starts": [1]}, "context_ids"),
    ([1, 2], "body"),
]


@pytest.mark.parametrize("body, field", BAD, ids=[f for _, f in BAD])
def test_a_malformed_request_names_its_field(body, field):
    with pytest.raises(RequestError) as caught:
        request_from_json(body)
    assert caught.value.field == field and caught.value.status == 400


def test_a_broken_binary_body_is_refused():
    good = encode_request(ScoreRequest.from_rows(PROMPTS, RESPONSES))
    for body in (b"", b"\xff" * 8 + good[8:], good[:-3], b"\x05\x00\x00\x00\x00\x00\x00\x00{}{}"):
        with pytest.raises(RequestError, match=r"body|format"):
            decode_request(body)


def test_split_rows_keeps_each_request_within_the_limit():
    assert split_rows([3, 3, 3, 5], 6) == [[0, 1], [2], [3]]
    assert split_rows([], 6) == []
    with pytest.raises(EopdError, match="max_request_tokens = 6"):
        split_rows([3, 7], 6)


def test_the_driver_refuses_a_served_teacher_that_is_not_its_own():
    cfg = config_from_dict(
        {
            "model": {"student_path": "/m/s", "teacher_path": "/m/t"},
            "data": {"toy_prompts": 8},
            "teacher": {"top_k": 8},
        }
    )
    ok = TeacherIdentity(
        model="/m/t",
        vocab_rows=320,
        vocab_digest="abc",
        top_k=16,
        dtype="float32",
        default_temperature=1.0,
        max_request_tokens=100,
        max_positions=512,
    )
    check_served_teacher(ok, cfg, 320, "abc")
    for change, words in (
        ({"model": "/m/other"}, "serves '/m/other'"),
        ({"vocab_digest": "def"}, "vocabulary differs"),
        ({"vocab_rows": 352}, "over 352 ids"),
        ({"top_k": 4}, "teacher.top_k = 8"),
        ({"temperature_semantics": "softmax(logits)"}, "temperature semantics"),
    ):
        with pytest.raises(ServedTeacherMismatch, match=words):
            check_served_teacher(dataclasses.replace(ok, **change), cfg, 320, "abc")
    assert TeacherIdentity.from_json(ok.to_json()) == ok
    # The application names local directories by absolute path; a job may give a relative one.
    relative = config_from_dict(
        {
            "model": {"student_path": "runs/s", "teacher_path": "runs/tiny/t"},
            "data": {"toy_prompts": 8},
        }
    )
    served_here = dataclasses.replace(ok, model=os.path.abspath("runs/tiny/t"))
    check_served_teacher(served_here, relative, 320, "abc")
    with pytest.raises(ServedTeacherMismatch, match="serves '/elsewhere/runs/tiny/t'"):
        check_served_teacher(
            dataclasses.replace(ok, model="/elsewhere/runs/tiny/t"), relative, 320, "abc"
        )
    assert np.isfinite(ok.default_temperature)
