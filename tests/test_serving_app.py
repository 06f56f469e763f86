"""The served teacher on a real local Ray + Serve (one start for the module, 2 replicas of a
tiny teacher): served answers equal TeacherWorker.score's, through the handle and HTTP (binary
and JSON); bad HTTP requests get a 4xx naming the field; a replica killed mid-request is retried
on the other one."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from test_teacher import make_cfg, ragged_batch

from eopd_ray.core.invariants import check_teacher_scores
from eopd_ray.ports import free_port
from eopd_ray.roles.teacher import TeacherWorker
from eopd_ray.serving.adapter import ServedTeacher, check_served_teacher
from eopd_ray.serving.client import HttpTeacherClient, TeacherClient
from eopd_ray.serving.codec import BINARY_TYPE, JSON_TYPE, encode_request
from eopd_ray.serving.schema import RequestError, ScoreRequest, vocab_digest

APP = "teacher-under-test"
TOKEN_ENV = "EOPD_TEST_TEACHER_TOKEN"
TOKEN = "s3cret"
BATCH_WAIT_S = 1.0  # a lone request waits this long in its replica: the window to kill it in


@pytest.fixture(scope="module")
def served(tiny_pair):
    """(cfg, handle client, HTTP url) of one application with 2 replicas."""
    import ray
    from ray import serve

    from eopd_ray.driver.actors import WORKER_ENV
    from eopd_ray.serving.app import ServeSettings, serve_teacher

    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS is set: these tests start their own local Ray")
    os.environ[TOKEN_ENV] = TOKEN  # the replicas inherit it from this process
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths
    ray.init(
        address="local",
        namespace="eopd-serving-test",
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp,
        runtime_env={"env_vars": WORKER_ENV},
    )
    port = free_port()
    cfg = make_cfg(tiny_pair, max_tokens_per_micro_batch=64)
    settings = ServeSettings(
        name=APP,
        route_prefix="/teacher",
        min_replicas=2,
        max_replicas=2,
        max_request_tokens=2000,
        max_batch_tokens=4000,
        batch_wait_s=BATCH_WAIT_S,
        token_env=TOKEN_ENV,
        http_port=port,
    )
    try:
        serve_teacher(settings, cfg)
        yield cfg, TeacherClient(APP, timeout_s=120), f"http://127.0.0.1:{port}/teacher"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(TOKEN_ENV, None)
        shutil.rmtree(temp, ignore_errors=True)


def assert_same_scores(served, in_job, atol=1e-5):
    """Equal within fp32 reduction-order tolerance (other micro-batches, other padding)."""
    for name in ("token_logprobs", "entropy", "topk_logprobs"):
        torch.testing.assert_close(getattr(served, name), getattr(in_job, name), atol=atol, rtol=0)
    agree = (served.topk_ids == in_job.topk_ids).float().mean()
    assert agree > 0.99, agree  # a near-tie may swap two ids


def test_served_scores_equal_the_in_job_teachers(served, tiny_pair):
    cfg, client, url = served
    worker = TeacherWorker(cfg, rank=0)
    batch = ragged_batch(plen=(5, 3, 4, 6), rlen=(7, 2, 5, 9), seed=1)
    in_job = worker.score(batch)
    teacher = ServedTeacher(cfg, client)
    check_served_teacher(
        teacher.identity, cfg, worker.vocab_rows, vocab_digest(worker.student_tokenizer)
    )
    by_handle, started, ended = teacher.timed("score", batch)
    assert started <= ended
    assert_same_scores(by_handle, in_job)
    check_teacher_scores(by_handle, batch, worker.vocab_rows, step=0, worker="served")
    request = ScoreRequest.from_rows(*map(list, zip(*_rows(batch), strict=True)))
    for binary in (True, False):
        http = HttpTeacherClient(url, token=TOKEN, binary=binary, timeout_s=60)
        answer = http.score(request)
        assert answer.model == cfg.model.teacher_path  # every answer says what served it
        assert_same_scores(answer.to_scores(batch.response_ids.shape[1]), in_job)
    # The text form: prompt text + template, rendered by the teacher's tokenizer.
    texts = worker.tokenizer.batch_decode([p for p, _ in _rows(batch)])
    rendered = ScoreRequest.from_texts(texts, "raw", [r for _, r in _rows(batch)])
    answer = client.score(rendered)
    again = [worker.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    direct = client.score(ScoreRequest.from_rows(again, [r for _, r in _rows(batch)]))
    np.testing.assert_allclose(answer.entropy, direct.entropy, atol=1e-5)


def _rows(batch):
    from eopd_ray.core.forward import rows_of

    return list(
        zip(
            rows_of(batch.prompt_ids, batch.prompt_mask),
            rows_of(batch.response_ids, batch.response_mask),
            strict=True,
        )
    )


def post(url: str, body: bytes, kind: str = JSON_TYPE, token: str | None = TOKEN):
    headers = {"content-type": kind}
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_http_requests_get_a_4xx_naming_the_field(served):
    _, _, url = served
    good = {"contexts": [[5, 6, 7, 8]], "response_starts": [2]}
    assert post(f"{url}/score", json.dumps(good).encode())[0] == 200
    cases = [
        ({**good, "model_path": "/etc/passwd"}, 400, "model_path"),  # unknown fields refused
        ({**good, "model": "org/other"}, 400, "model"),  # never loads another model
        ({**good, "response_starts": [0]}, 400, "response_starts"),
        ({**good, "contexts": [[5, "x"]]}, 400, "contexts"),
        ({**good, "temperature": 0}, 400, "temperature"),
        ({**good, "contexts": [[5, 6, 10**6]]}, 400, "context_ids"),  # outside the vocabulary
        ({"prompt_texts": ["hi"], "template": "../x.jinja", "responses": [[5]]}, 400, "template"),
        ({"contexts": [[5] * 1500, [6] * 1500], "response_starts": [1, 1]}, 413, "context_ids"),
    ]
    for body, status, field in cases:
        got, answer = post(f"{url}/score", json.dumps(body).encode())
        assert (got, answer["field"]) == (status, field), (body, answer)
    got, answer = post(f"{url}/score", json.dumps(cases[-1][0]).encode())
    assert "max_request_tokens = 2000" in answer["error"]
    assert post(f"{url}/score", b"{not json")[0] == 400
    assert post(f"{url}/score", b"\x00" * 20, kind=BINARY_TYPE)[1]["field"] == "body"
    assert post(f"{url}/score", b"{}", kind="text/plain")[0] == 415
    assert post(f"{url}/score", json.dumps(good).encode(), token=None)[0] == 401
    assert post(f"{url}/score", json.dumps(good).encode(), token="wrong")[0] == 401
    bad = ScoreRequest.from_rows([[5, 6]], [[7]], model="someone/else")
    with pytest.raises(RequestError, match="serves"):
        HttpTeacherClient(url, token=TOKEN).score(bad)
    assert post(f"{url}/score", encode_request(bad), kind=BINARY_TYPE)[1]["field"] == "model"


def test_a_replica_killed_mid_request_is_retried_on_another(served, caplog):
    import ray

    _, client, _ = served
    replicas = [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and APP in a["name"]
    ]
    assert len(replicas) == 2
    request = ScoreRequest.from_rows([[5, 6, 7], [9, 10]], [[11, 12, 13, 14], [15]])
    expected = client.score(request)

    def ongoing(replica) -> int:
        return ray.get(replica.get_num_ongoing_requests.remote(), timeout=10)

    # A replica counts a request as ongoing a little after its answer has arrived: wait until
    # the first one is counted out, or the kill below could hit the idle replica.
    deadline = time.monotonic() + 30
    while any(ongoing(r) for r in replicas):
        assert time.monotonic() < deadline, "a replica still counts the first request"
        time.sleep(0.05)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(answer=client.score(request)))
    thread.start()
    killed = None
    deadline = time.monotonic() + 30
    while killed is None and time.monotonic() < deadline:  # the request waits BATCH_WAIT_S
        for replica in replicas:
            if ongoing(replica) > 0:
                ray.kill(replica, no_restart=True)
                killed = replica
                break
    thread.join(timeout=120)
    assert killed is not None, "never saw the request on a replica"
    assert "replica lost mid-request" in caplog.text  # the kill hit the request in flight
    answer = result["answer"]  # answered once, by the surviving replica
    assert answer.lengths == [4, 1]
    np.testing.assert_allclose(answer.entropy, expected.entropy, atol=1e-6)
    np.testing.assert_array_equal(answer.topk_ids, expected.topk_ids)


def test_serves_request_count_warning_is_dropped_and_nothing_else():
    """Serve's max_batch_size x max_concurrent_batches > max_ongoing_requests warning counts
    requests; the batches here count tokens, so the replica drops that one message only."""
    from eopd_ray.serving.app import TokenBatchesFilter

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.serve", logging.WARNING, __file__, 1, message, None, None)

    serve_warning = (
        "`max_batch_size` (65536) * `max_concurrent_batches` (1) is larger than "
        "`max_ongoing_requests` (16). This means the replica will never achieve ..."
    )
    assert not TokenBatchesFilter().filter(record(serve_warning))
    assert TokenBatchesFilter().filter(record("Replica failed health check"))
