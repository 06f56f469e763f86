"""The next step's stream run in a driver thread while the learners train (rollout.async_lag: 1
with rollout.stream: true)."""

from __future__ import annotations

import logging
import threading

from eopd_ray.driver.heartbeats import HEARTBEAT_S
from eopd_ray.driver.streamed import StepStream, StreamedBatch

log = logging.getLogger(__name__)


class StreamInBackground:
    """A prefetched stream (rollout.async_lag: 1) run in a driver thread while the learners
    train: the next step's groups are scored as they finish. `result()` joins it."""

    def __init__(self, stream: StepStream) -> None:
        self.stream = stream
        self._result: StreamedBatch | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="stream-prefetch")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self.stream.run()
        except BaseException as exc:  # re-raised in the driver's thread by result()
            self._error = exc

    def result(self) -> StreamedBatch:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self, timeout_s: float) -> None:
        """Stop the stream and wait for its thread (its generations cancelled, see
        `StepStream.cancel`); its outcome is dropped."""
        self.stream.cancel()
        self._thread.join(timeout_s + 2 * HEARTBEAT_S)
        if self._thread.is_alive():
            log.warning("the cancelled prefetch stream did not stop within %.0fs", timeout_s)
