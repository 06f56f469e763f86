"""The served teacher's own metrics (ray.util.metrics), beside Serve's per-deployment ones.

On every node's metrics export port (`/metrics`) as `ray_eopd_teacher_serve_<name>`, tagged with
the application and the served model:

    requests_total{route, status}   requests answered (status 200) or refused (4xx), per way in
    tokens_total                    prompt + response tokens scored
    batch_requests, batch_tokens    requests and tokens per scored batch (histograms)
    queue_s                         time a request waited in its replica before its batch ran
    batch_s                         time to score one batch
    tokens_per_s                    tokens / batch_s of the last batch (gauge)

Serve adds its own (`ray_serve_deployment_request_counter`, `..._processing_latency_ms`,
`ray_serve_batch_*`, replica counts) with the deployment name `TeacherReplica`.
"""

from __future__ import annotations

from ray.util import metrics

_SECONDS = [0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128]
_TOKENS = [256, 1024, 4096, 16384, 65536, 262144]


class ServeMetrics:
    def __init__(self, app: str, model: str) -> None:
        tags = ("app", "model")
        self.tags = {"app": app, "model": model}
        name = "eopd_teacher_serve_"
        self.requests = metrics.Counter(
            name + "requests_total", "requests per way in and status", (*tags, "route", "status")
        )
        self.tokens = metrics.Counter(name + "tokens_total", "tokens scored", tags)
        self.batch_requests = metrics.Histogram(
            name + "batch_requests", "requests per scored batch", _COUNTS, tags
        )
        self.batch_tokens = metrics.Histogram(
            name + "batch_tokens", "tokens per scored batch", _TOKENS, tags
        )
        self.queue_s = metrics.Histogram(
            name + "queue_s", "seconds a request waited for its batch", _SECONDS, tags
        )
        self.batch_s = metrics.Histogram(
            name + "batch_s", "seconds to score one batch", _SECONDS, tags
        )
        self.tokens_per_s = metrics.Gauge(
            name + "tokens_per_s", "tokens per second of the last batch", tags
        )

    def answered(self, route: str, tokens: int) -> None:
        self.requests.inc(1, {**self.tags, "route": route, "status": "200"})
        self.tokens.inc(tokens, self.tags)

    def refused(self, route: str, status: int) -> None:
        self.requests.inc(1, {**self.tags, "route": route, "status": str(status)})

    def queued(self, seconds: float) -> None:
        self.queue_s.observe(seconds, self.tags)

    def batch(self, num_requests: int, tokens: int, seconds: float) -> None:
        self.batch_requests.observe(num_requests, self.tags)
        self.batch_tokens.observe(tokens, self.tags)
        self.batch_s.observe(seconds, self.tags)
        self.tokens_per_s.set(tokens / max(seconds, 1e-9), self.tags)
