"""Clients of the served teacher: a Ray handle for jobs on the same cluster, HTTP for the rest.

    client = TeacherClient("teacher")                                 # on the cluster, no HTTP
    client = HttpTeacherClient("http://127.0.0.1:8000/teacher", token=os.environ["TOKEN"])
    answer = client.score(ScoreRequest.from_rows(prompts, responses, temperature=1.0))
    answer.to_scores()                                                # TeacherScores (B, T, K)

Both retry a request whose replica died on the way (scoring holds no state, so a retried row is
answered once, by whichever replica scores it), and `score_many` sends several requests at once
so that every replica works. `split_rows` cuts rows into requests within the application's
`max_request_tokens`. The HTTP client needs only the standard library, numpy and safetensors.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from eopd_ray.errors import EopdError
from eopd_ray.serving.codec import (
    BINARY_TYPE,
    JSON_TYPE,
    answer_from_json,
    decode_answer,
    encode_request,
    request_to_json,
)
from eopd_ray.serving.schema import RequestError, ScoreAnswer, ScoreRequest, TeacherIdentity

log = logging.getLogger(__name__)
RETRY_STATUS = (500, 502, 503, 504)


class TeacherUnavailable(EopdError):
    """The served teacher did not answer: no application, no replica, or retries used up."""


def split_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive rows grouped so that each group's tokens (prompt + response) stay within
    `max_tokens`; a row longer than that on its own is refused."""
    groups: list[list[int]] = [[]]
    used = 0
    for row, n in enumerate(lengths):
        if n > max_tokens:
            raise EopdError(
                f"row {row} has {n} tokens, more than the served teacher's max_request_tokens = "
                f"{max_tokens}; raise it on the teacher application"
            )
        if used + n > max_tokens and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(row)
        used += n
    return [g for g in groups if g]


class TeacherClient:
    """A Ray Serve handle to the application `app_name` on the connected cluster."""

    def __init__(self, app_name: str = "teacher", timeout_s: float = 600.0, retries: int = 2):
        import ray
        from ray import serve
        from ray.serve.exceptions import DeploymentUnavailableError

        self.app_name, self.timeout_s, self.retries = app_name, timeout_s, retries
        self._gone = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        # What a handle raises once the application is deleted (or mid-redeploy): at once,
        # with only the deployment's name as message.
        self._no_app = DeploymentUnavailableError
        try:
            self.handle = serve.get_app_handle(app_name)
        except Exception as exc:  # Serve raises RayServeException / ValueError by version
            raise TeacherUnavailable(
                f"no teacher application {app_name!r} on this Ray cluster ({exc}); start it "
                "(docs/running.md, 'Sharing one teacher between jobs') or fix teacher.serve"
            ) from None

    def identity(self) -> TeacherIdentity:
        try:
            return self.handle.describe.remote().result(timeout_s=self.timeout_s)
        except self._no_app as exc:
            raise self._app_gone(exc) from None

    def _app_gone(self, exc: Exception) -> TeacherUnavailable:
        return TeacherUnavailable(
            f"teacher application {self.app_name!r} is no longer deployed on this Ray cluster "
            f"({type(exc).__name__}: {exc}); it was deleted, or is being redeployed"
        )

    def score(self, request: ScoreRequest) -> ScoreAnswer:
        return self.score_many([request])[0]

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[ScoreAnswer]:
        """All of `requests` in flight at once; each retried (up to `retries` times) when the
        replica holding it dies. Waits at most `timeout_s` in all."""
        deadline = time.monotonic() + self.timeout_s
        pending = {i: self.handle.score.remote(r) for i, r in enumerate(requests)}
        tries = dict.fromkeys(pending, 0)
        answers: dict[int, ScoreAnswer] = {}
        while pending:
            i, response = next(iter(pending.items()))
            left = deadline - time.monotonic()
            try:
                answers[i] = response.result(timeout_s=max(left, 0.001))
            except TimeoutError:
                raise TeacherUnavailable(
                    f"teacher application {self.app_name!r} did not answer within "
                    f"{self.timeout_s:.0f} s ({len(pending)} request(s) outstanding)"
                ) from None
            except self._no_app as exc:
                tries[i] += 1
                if tries[i] > self.retries:
                    raise self._app_gone(exc) from None
                time.sleep(1.0)  # a redeploy ends; a deleted application stays gone
                pending[i] = self.handle.score.remote(requests[i])
                continue
            except self._gone as exc:
                tries[i] += 1
                if tries[i] > self.retries:
                    raise TeacherUnavailable(
                        f"teacher application {self.app_name!r}: a replica died under the same "
                        f"request {tries[i]} times ({type(exc).__name__})"
                    ) from exc
                log.warning("teacher replica lost mid-request (%s); retrying", type(exc).__name__)
                pending[i] = self.handle.score.remote(requests[i])
                continue
            del pending[i]
        return [answers[i] for i in range(len(requests))]


class HttpTeacherClient:
    """The application over HTTP, e.g. http://127.0.0.1:8000/teacher (its route prefix)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        binary: bool = True,
        timeout_s: float = 600.0,
        retries: int = 2,
    ) -> None:
        self.url, self.token, self.binary = url.rstrip("/"), token, binary
        self.timeout_s, self.retries = timeout_s, retries

    def _call(self, path: str, body: bytes | None, content_type: str | None) -> tuple[bytes, str]:
        headers = {"accept": BINARY_TYPE if self.binary else JSON_TYPE}
        if content_type:
            headers["content-type"] = content_type
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(f"{self.url}/{path}", body, headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    return reply.read(), reply.headers.get("content-type", "")
            except urllib.error.HTTPError as exc:
                text = exc.read()
                if exc.code not in RETRY_STATUS or attempt == self.retries:
                    raise _refusal(exc.code, text) from None
                log.warning("teacher answered %d; retrying", exc.code)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if attempt == self.retries:
                    raise TeacherUnavailable(f"{self.url}: {exc}") from None
                log.warning("teacher at %s unreachable (%s); retrying", self.url, exc)
            time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def identity(self) -> TeacherIdentity:
        body, _ = self._call("identity", None, None)
        return TeacherIdentity.from_json(json.loads(body))

    def score(self, request: ScoreRequest) -> ScoreAnswer:
        if self.binary:
            body, kind = self._call("score", encode_request(request), BINARY_TYPE)
        else:
            body = json.dumps(request_to_json(request)).encode()
            body, kind = self._call("score", body, JSON_TYPE)
        if kind.startswith(JSON_TYPE):
            return answer_from_json(json.loads(body))
        return decode_answer(body)

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[ScoreAnswer]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, len(requests) or 1)) as pool:
            return list(pool.map(self.score, requests))


def _refusal(status: int, body: bytes) -> EopdError:
    try:
        data = json.loads(body)
        return RequestError(data["field"], data["message"], status)
    except (ValueError, KeyError, TypeError):
        text = body[:500].decode(errors="replace")
        return TeacherUnavailable(f"teacher answered HTTP {status}: {text}")
