"""Ending Ray calls the driver no longer wants, so the workers are free for what comes next.

    cancel_calls(calls, workers, timeout_s, what)

A worker takes one call at a time: a generation or a weight broadcast left running after the
step that wanted it has failed holds its worker, and the recovery's own calls (a rejoin, a
weight push) queue behind it until they time out. `ray.cancel` does not interrupt a running call
of a plain actor; it sets a flag the call checks (eopd_ray/roles/cancellation.py: between engine
steps, between broadcast polls). A call that has not ended by `timeout_s` gets its worker
killed (Ray restarts a restartable role); a call whose worker is None (a learner: never killed
here) is left to end by itself. Every outcome is read, so Ray logs no "Unhandled error".
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import ray

log = logging.getLogger(__name__)


def _read_to_end(call, deadline: float) -> bool:
    """Read a call's outcome (every item of a streaming generator), dropping results and errors,
    by `deadline` (time.monotonic); False if it is still running then."""
    streaming = isinstance(call, ray.ObjectRefGenerator)
    while True:
        ready, _ = ray.wait([call], timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        if not streaming:
            with contextlib.suppress(Exception):
                ray.get(call, timeout=0)
            return True
        try:
            ray.get(next(call))
        except StopIteration:
            return True
        except Exception:  # the cancellation itself, or the worker's loss
            continue


def cancel_calls(calls: list, workers: list[Any | None], timeout_s: float, what: str) -> None:
    """Cancel `calls` (ObjectRefs or streaming generators; `workers[i]` the actor running call
    i, or None) and wait up to `timeout_s` for them to end; kill the workers of those that do
    not (see the module docstring)."""
    for call in calls:
        with contextlib.suppress(Exception):
            ray.cancel(call)
    deadline = time.monotonic() + timeout_s
    stuck = [w for c, w in zip(calls, workers, strict=True) if not _read_to_end(c, deadline)]
    for worker in stuck:
        if worker is not None:
            log.warning(
                "%s: a cancelled call did not end within %.0fs; killing its worker", what, timeout_s
            )
            ray.kill(worker, no_restart=False)
    if any(w is not None for w in stuck):  # the killed workers' calls end now: read them
        for call in calls:
            _read_to_end(call, time.monotonic() + timeout_s)
