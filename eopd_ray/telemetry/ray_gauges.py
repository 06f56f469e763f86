"""Application metrics on Ray's Prometheus endpoint (and so in the Ray dashboard's Grafana).

Every per-step metric of the driver becomes a gauge `ray_eopd_<area>_<name>` (e.g.
`loss/fkl` -> `ray_eopd_loss_fkl`) tagged with the run's name and id (`run`, `run_id`: runs of
one name never mix); workers export their own gauges (`ray_eopd_worker_*`) tagged with run id,
role and rank. Each Ray node serves them at
`http://<node>:<metrics-export-port>/metrics` (docs/monitoring.md).
"""

from __future__ import annotations

import re
import sys
import time
from functools import cache

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(key: str, prefix: str = "eopd") -> str:
    """`loss/fkl` -> `eopd_loss_fkl` (Prometheus names allow letters, digits and _)."""
    return f"{prefix}_{_UNSAFE.sub('_', key)}"


@cache
def _gauge(name: str, tag_keys: tuple[str, ...]):
    from ray.util.metrics import Gauge

    return Gauge(name, description=f"eopd-ray metric {name}", tag_keys=tag_keys)


@cache
def _counter(name: str, tag_keys: tuple[str, ...]):
    from ray.util.metrics import Counter

    return Counter(name, description=f"eopd-ray counter {name}", tag_keys=tag_keys)


def _ray_running() -> bool:
    """Workers also run without Ray (unit tests, jobs/bench/gpu_check.py on a machine that has
    no Ray): then they export nothing, and never import Ray for it."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


class RayMetricsSink:
    """The driver's sink: one gauge per metric key, plus a step counter."""

    def __init__(self, run_name: str, run_id: str | None) -> None:
        self.tags = {"run": run_name, "run_id": run_id or ""}

    def write(self, step: int, metrics: dict[str, float]) -> None:
        keys = tuple(self.tags)
        for key, value in metrics.items():
            _gauge(metric_name(key), keys).set(float(value), tags=self.tags)
        _gauge("eopd_step", keys).set(float(step), tags=self.tags)
        _counter("eopd_steps_total", keys).inc(1.0, tags=self.tags)

    def close(self) -> None:
        pass


class WorkerMetrics:
    """A worker's gauges, tagged with its role and rank."""

    def __init__(self, role: str, rank: int, run_id: str | None = None) -> None:
        self.tags = {"run_id": run_id or "", "role": role, "rank": str(rank)}

    def set(self, key: str, value: float) -> None:
        if _ray_running():
            name = metric_name(key, "eopd_worker")
            _gauge(name, tuple(self.tags)).set(float(value), tags=self.tags)

    def throughput(self, stage: str, tokens: int, started: float) -> None:
        """`<stage>/tokens_per_s` and `<stage>/seconds` of a call that began at `started`."""
        seconds = max(time.perf_counter() - started, 1e-9)
        self.set(f"{stage}/tokens_per_s", tokens / seconds)
        self.set(f"{stage}/seconds", seconds)
