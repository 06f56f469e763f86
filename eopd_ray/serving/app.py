"""The teacher as a Ray Serve application: replicas of TeacherWorker's scoring engine that many
jobs share, through a Ray handle (jobs on the cluster) or HTTP (anything else).

    serve run eopd_ray.serving.app:build_app config=jobs/configs/tiny.yaml max_replicas=2
    python jobs/serve_teacher.py --config jobs/configs/tiny.yaml            # the same, blocking
    handle = serve_teacher(ServeSettings(config="jobs/configs/tiny.yaml"))   # from Python

The served model is the job config's `model.teacher_path` (pinned once, when the application is
built: a hub commit, a URI listing, a GGUF sha256), scored with the config's `teacher.*` settings
by `TeacherWorker.score_rows`, the code the in-job teacher runs: the same numbers. Requests that
arrive together are joined (Serve's dynamic batching, up to `max_batch_tokens`) and cut into the
worker's own micro-batches (`teacher.max_tokens_per_micro_batch`, else `micro_batch_size`).
Replicas take `teacher.gpus_per_worker` GPUs and `teacher.cpus_per_worker` CPUs and autoscale
between `min_replicas` and `max_replicas`.

HTTP, under `route_prefix` (default /teacher): `GET /identity` (TeacherIdentity as JSON) and
`POST /score` with a binary (safetensors) or JSON body (eopd_ray.serving.codec). When the
environment variable `token_env` is set on the replicas, every request must carry
`Authorization: Bearer <token>`; a replica refuses to start when Serve's HTTP proxy listens
beyond loopback without one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from eopd_ray.config import Config, load_config
from eopd_ray.errors import EopdError
from eopd_ray.serving.codec import (
    BINARY_TYPE,
    JSON_TYPE,
    answer_to_json,
    decode_request,
    encode_answer,
    request_from_json,
)
from eopd_ray.serving.schema import (
    RequestError,
    ScoreAnswer,
    ScoreRequest,
    TeacherIdentity,
    vocab_digest,
)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # see eopd_ray.driver.actors

from ray import serve

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """How the teacher is served (the model and its scoring come from `config`)."""

    config: str = ""  # a job's YAML: model.*, teacher.*, rollout.temperature
    overrides: tuple[str, ...] = ()  # dotted overrides of `config`, as jobs/distill.py takes
    name: str = "teacher"  # the application's name: `teacher.serve` of the jobs that use it
    route_prefix: str = "/teacher"
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0  # autoscaling aims at this many requests per replica
    max_ongoing_requests: int = 16  # per replica; more wait in the handle's queue
    max_request_tokens: int = 65536  # prompt + response tokens of one request (413 over it)
    max_batch_tokens: int = 65536  # tokens of the requests one batch joins (>= the above)
    batch_wait_s: float = 0.005  # how long a batch waits for more requests
    max_body_bytes: int = 64 << 20  # HTTP bodies over it are refused before they are read
    token_env: str = "EOPD_TEACHER_TOKEN"  # env var with the HTTP token (unset: none needed)
    http_host: str = "127.0.0.1"  # serve_teacher(): where Serve's HTTP proxy listens
    http_port: int = 8000

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise EopdError(
                f"min_replicas = {self.min_replicas}, max_replicas = {self.max_replicas}: "
                "need 1 <= min_replicas <= max_replicas"
            )
        if self.max_batch_tokens < self.max_request_tokens:
            raise EopdError(
                f"max_batch_tokens = {self.max_batch_tokens} < max_request_tokens = "
                f"{self.max_request_tokens}: a batch must hold the largest request; raise "
                "max_batch_tokens"
            )

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeSettings:
        """From `serve run ... key=value` arguments (strings) or a config file's `args`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise EopdError(
                f"unknown teacher application argument(s) {unknown}; known: {sorted(fields)}"
            )
        out: dict[str, Any] = {}
        for key, value in args.items():
            kind = type(getattr(cls(), key))
            if kind is tuple:
                out[key] = tuple(value.split()) if isinstance(value, str) else tuple(value)
            else:
                out[key] = kind(value)
        return cls(**out)


@dataclass
class _Pending:
    """One request's rows, waiting in a replica's batch queue."""

    prompts: list[list[int]]
    responses: list[list[int]]
    temperature: float
    merged_ids: tuple[int, int] | None
    arrived: float  # time.perf_counter() when it reached the replica

    @property
    def num_tokens(self) -> int:
        return sum(len(p) + len(r) for p, r in zip(self.prompts, self.responses, strict=True))


def _num_tokens(items: list[_Pending]) -> int:
    return sum(i.num_tokens for i in items)


class TokenBatchesFilter(logging.Filter):
    """Drops Serve's warning that `max_batch_size` x `max_concurrent_batches` exceeds
    `max_ongoing_requests`: it counts both in requests, but this application's batches are
    counted in tokens (`batch_size_fn`), so a batch of 65,536 tokens is a few requests and the
    warning, printed at every replica start, is always wrong here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is larger than `max_ongoing_requests`" not in record.getMessage()


class TeacherReplica:
    """One replica: a TeacherWorker and the request handling around it."""

    def __init__(self, cfg: Config, settings: ServeSettings, model: str) -> None:
        from eopd_ray.roles.teacher import TeacherWorker
        from eopd_ray.serving.metrics import ServeMetrics

        logging.getLogger("ray.serve").addFilter(TokenBatchesFilter())

        self.settings, self.model_spec = settings, model
        self.token = os.environ.get(settings.token_env) or None
        self._check_exposure()
        context = serve.get_replica_context()
        rank = getattr(getattr(context, "rank", None), "rank", 0) or 0
        self.worker = TeacherWorker(cfg, rank=rank)
        model_cfg = self.worker.model.config
        self.identity = TeacherIdentity(
            model=model,
            vocab_rows=self.worker.vocab_rows,
            vocab_digest=vocab_digest(self.worker.tokenizer),
            top_k=cfg.teacher.top_k,
            dtype=cfg.model.dtype,
            default_temperature=cfg.rollout.temperature,
            max_request_tokens=settings.max_request_tokens,
            max_positions=getattr(model_cfg, "max_position_embeddings", None) or 1 << 30,
        )
        self.embedding_rows = model_cfg.vocab_size
        self.metrics = ServeMetrics(settings.name, model)
        self._batched.set_max_batch_size(settings.max_batch_tokens)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_s)

    def _check_exposure(self) -> None:
        """No token and an HTTP proxy beyond loopback: refuse to serve."""
        if self.token is not None:
            return
        try:
            from ray.serve.context import _get_global_client

            host = _get_global_client().http_config.host
        except Exception:  # no controller to ask (a replica built outside Serve, in a test)
            return
        if host not in LOOPBACK:
            raise EopdError(
                f"Serve's HTTP proxy listens on {host}, beyond loopback, and "
                f"{self.settings.token_env} is not set on the replicas: set it (a Kubernetes "
                "Secret, cluster/rayservice-teacher.yaml) or keep http_options.host at 127.0.0.1"
            )

    # ------------------------------------------------------------------ the ways in

    def describe(self) -> TeacherIdentity:
        return self.identity

    def pid(self) -> int:
        return os.getpid()

    async def score(self, request: ScoreRequest) -> ScoreAnswer:
        """The handle's way in (no HTTP): one request, answered when its batch is scored."""
        return await self._answer(request, "handle")

    async def __call__(self, http) -> Any:
        """HTTP: GET {prefix}/identity, POST {prefix}/score."""
        from starlette.responses import JSONResponse, Response

        path = http.url.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            self._check_token(http.headers.get("authorization"))
            if path == "identity" and http.method == "GET":
                return JSONResponse(self.identity.to_json())
            if path != "score" or http.method != "POST":
                raise RequestError("path", f"{http.method} {http.url.path} is not served", 404)
            request = await self._read(http)
            answer = await self._answer(request, "http")
            if http.headers.get("accept", "").startswith(JSON_TYPE):
                return JSONResponse(answer_to_json(answer))
            return Response(encode_answer(answer), media_type=BINARY_TYPE)
        except RequestError as exc:
            self.metrics.refused("http", exc.status)
            body = {"error": str(exc), "field": exc.field, "message": exc.message}
            return JSONResponse(body, status_code=exc.status)

    def _check_token(self, header: str | None) -> None:
        import hmac

        if self.token is None:
            return
        given = (header or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise RequestError("authorization", "missing or wrong bearer token", 401)

    async def _read(self, http) -> ScoreRequest:
        import json

        length = int(http.headers.get("content-length") or 0)
        if length > self.settings.max_body_bytes:
            raise RequestError(
                "body",
                f"{length} bytes exceed max_body_bytes = {self.settings.max_body_bytes}",
                413,
            )
        body = await http.body()
        kind = http.headers.get("content-type", "").split(";")[0].strip()
        if kind == BINARY_TYPE:
            return decode_request(body)
        if kind == JSON_TYPE:
            try:
                data = json.loads(body)
            except ValueError as exc:
                raise RequestError("body", f"not JSON ({exc})") from None
            return request_from_json(data)
        raise RequestError("content-type", f"{kind!r}; send {BINARY_TYPE} or {JSON_TYPE}", 415)

    # ------------------------------------------------------------------ scoring

    async def _answer(self, request: ScoreRequest, route: str) -> ScoreAnswer:
        try:
            pending = self._pending(request)
        except RequestError as exc:
            if route == "handle":
                self.metrics.refused(route, exc.status)
            raise
        answer = await self._batched(pending)
        self.metrics.answered(route, pending.num_tokens)
        return answer

    def _pending(self, request: ScoreRequest) -> _Pending:
        """The request's teacher-side rows, checked against this replica's model and limits."""
        request.check_shape()
        if request.model is not None and request.model != self.model_spec:
            raise RequestError(
                "model", f"this application serves {self.model_spec!r}, not {request.model!r}"
            )
        if request.by_text:
            from eopd_ray.core.prompts import render_prompt

            tok = self.worker.tokenizer
            prompts = [render_prompt(t, request.template, tok) for t in request.prompt_texts]
            responses = request.responses()
        else:
            prompts, responses = request.rows()
        ids_field = "response_ids" if request.by_text else "context_ids"
        for rows in (prompts, responses):
            top = max((max(r) for r in rows if r), default=0)
            if top >= self.embedding_rows:
                raise RequestError(
                    ids_field, f"id {top} is outside the teacher's {self.embedding_rows} ids"
                )
        if request.merged_ids is not None and max(request.merged_ids) >= self.worker.vocab_rows:
            raise RequestError(
                "merged_ids", f"{request.merged_ids} outside the {self.worker.vocab_rows} ids"
            )
        pending = _Pending(
            prompts, responses, request.temperature, request.merged_ids, time.perf_counter()
        )
        longest = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
        if longest > self.identity.max_positions:
            raise RequestError(
                ids_field,
                f"a row of {longest} tokens exceeds the model's {self.identity.max_positions} "
                "positions (max_positions)",
                413,
            )
        if pending.num_tokens > self.settings.max_request_tokens:
            raise RequestError(
                ids_field,
                f"{pending.num_tokens} tokens exceed max_request_tokens = "
                f"{self.settings.max_request_tokens} of this application; split the request "
                "(the package's clients do)",
                413,
            )
        return pending

    @serve.batch(max_batch_size=65536, batch_wait_timeout_s=0.005, batch_size_fn=_num_tokens)
    async def _batched(self, items: list[_Pending]) -> list[ScoreAnswer]:
        started = time.perf_counter()
        for item in items:
            self.metrics.queued(started - item.arrived)
        answers = await asyncio.to_thread(self._score_items, items)
        self.metrics.batch(len(items), _num_tokens(items), time.perf_counter() - started)
        return answers

    def _score_items(self, items: list[_Pending]) -> list[ScoreAnswer]:
        """Items that share a temperature and merged ids are scored together, as one batch of
        rows the worker cuts into its micro-batches."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[(item.temperature, item.merged_ids)].append(i)
        answers: list[ScoreAnswer | None] = [None] * len(items)
        for (temperature, merged), members in groups.items():
            prompts = [p for i in members for p in items[i].prompts]
            responses = [r for i in members for r in items[i].responses]
            lengths = [len(r) for r in responses]
            t = max(1, max(lengths))
            mask = torch.arange(t)[None] < torch.tensor(lengths)[:, None]  # (B, T)
            scores = self.worker.score_rows(prompts, responses, mask, temperature, merged)
            whole = ScoreAnswer.from_scores(scores, lengths, self.model_spec, temperature)
            start = 0
            for i in members:
                n = len(items[i].responses)
                answers[i] = _rows(whole, start, start + n)
                start += n
        return answers  # type: ignore[return-value]


def _rows(answer: ScoreAnswer, a: int, b: int) -> ScoreAnswer:
    """Rows [a, b) of a packed answer."""
    lo, hi = int(answer.offsets[a]), int(answer.offsets[b])
    return dataclasses.replace(
        answer,
        offsets=answer.offsets[a : b + 1] - lo,
        token_logprobs=answer.token_logprobs[lo:hi],
        entropy=answer.entropy[lo:hi],
        topk_ids=answer.topk_ids[lo:hi],
        topk_logprobs=answer.topk_logprobs[lo:hi],
    )


def teacher_config(settings: ServeSettings) -> Config:
    """The served job config with its models pinned (every replica loads the same weights)."""
    from eopd_ray.storage.sources import kind_of, pin_models

    if not settings.config:
        raise EopdError(
            "the teacher application needs config=<a job YAML> naming model.teacher_path and "
            "model.student_path (the vocabulary it scores over)"
        )
    cfg = pin_models(load_config(settings.config, settings.overrides))
    # Local model directories as absolute paths: the identity every answer carries must name
    # the same directory for a job that runs from another working directory.
    m = cfg.model
    local = {name: os.path.abspath(getattr(m, name)) for name in ("student_path", "teacher_path")
             if kind_of(getattr(m, name)) == "local"}  # fmt: skip
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **local))


def build(settings: ServeSettings, cfg: Config | None = None) -> serve.Application:
    """The application (not yet running): `cfg` defaults to `teacher_config(settings)`."""
    cfg = cfg or teacher_config(settings)
    t = cfg.teacher
    deployment = serve.deployment(
        TeacherReplica,
        name="TeacherReplica",
        ray_actor_options={
            "num_cpus": t.cpus_per_worker,
            "num_gpus": t.gpus_per_worker,
            "resources": dict(t.resources),
            "runtime_env": {"env_vars": _replica_env(t.cpus_per_worker)},
        },
        max_ongoing_requests=settings.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "initial_replicas": settings.min_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
        },
        health_check_period_s=10,
        graceful_shutdown_timeout_s=20,
    )
    return deployment.bind(cfg, settings, cfg.model.teacher_path)


def _replica_env(cpus: float) -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": str(max(1, int(cpus))),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    return env


def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run eopd_ray.serving.app:build_app config=... max_replicas=2` (or a Serve config
    file's `import_path` with `args`)."""
    return build(ServeSettings.from_args(args))


def serve_teacher(settings: ServeSettings, cfg: Config | None = None):
    """Start (or update) the application on the connected Ray cluster; returns its handle.
    Serve's HTTP proxy listens on `settings.http_host`: beyond loopback only with a token."""
    if settings.http_host not in LOOPBACK and not os.environ.get(settings.token_env):
        raise EopdError(
            f"http_host = {settings.http_host!r} exposes the teacher beyond this machine: set "
            f"{settings.token_env} (the bearer token clients must send) or use 127.0.0.1"
        )
    serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
    return serve.run(build(settings, cfg), name=settings.name, route_prefix=settings.route_prefix)
