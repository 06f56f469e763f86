"""A real Prometheus server for tests: scrapes one target on loopback, answers PromQL.

    with Prometheus(find_prometheus(), target="127.0.0.1:8080") as prom:
        prom.query('ray_eopd_loss_total{run="x"}')  # -> the API's result list

The server runs from Debian's `prometheus` package (or `EOPD_PROMETHEUS_BIN`), in its own process
group, on a free 127.0.0.1 port, with its own config and TSDB in a temp dir, so it never touches
the system service's data or port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from eopd_ray.ports import free_port

BIN_ENV = "EOPD_PROMETHEUS_BIN"
INSTALL_HINT = "install Debian's prometheus package: apt-get install prometheus (.ci/run does it)"


def find_prometheus() -> str | None:
    """The prometheus binary, or None. `EOPD_PROMETHEUS_BIN` wins (a missing path there hides
    the server, to check the skip); then PATH; then Debian's path, for a PATH without /usr/bin."""
    override = os.environ.get(BIN_ENV)
    if override is not None:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which("prometheus")
    if found:
        return found
    return "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None


def _config(target: str, interval_s: int) -> str:
    # JSON is YAML: no YAML writer needed. One job, one static target, scraped every interval.
    return json.dumps(
        {
            "global": {"scrape_interval": f"{interval_s}s"},
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [target]}]}],
        },
        indent=2,
    )


class Prometheus:
    """One Prometheus process scraping `target` ("host:port", path /metrics)."""

    def __init__(self, binary: str, target: str, interval_s: int = 1) -> None:
        self.binary = binary
        self.target = target
        self.interval_s = interval_s
        self.port = 0
        self.url = ""
        self._dir: Path | None = None
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="prom"))
        config = self._dir / "prometheus.yml"
        config.write_text(_config(self.target, self.interval_s))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The child keeps its own copy of the log's descriptor: ours can close at once.
        with open(self._dir / "prometheus.log", "wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self._dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() signals only what we started
            )
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                return
            except OSError:
                if self._proc.poll() is not None or time.time() > deadline:
                    tail = self.log()[-3000:]
                    self.stop()
                    raise RuntimeError(
                        f"prometheus ({self.binary}) was not ready on {self.url} within "
                        f"{timeout_s:.0f} s; its log:\n{tail}"
                    ) from None
                time.sleep(0.5)

    def query(self, promql: str) -> list[dict]:
        """Instant query via /api/v1/query: the result list ([] when no series match)."""
        url = f"{self.url}/api/v1/query?query={urllib.parse.quote(promql)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {promql!r} failed: {body}")
        return body["data"]["result"]

    def log(self) -> str:
        path = self._dir / "prometheus.log" if self._dir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; removes the config and TSDB."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
