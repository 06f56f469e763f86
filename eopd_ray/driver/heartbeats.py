"""Heartbeats: how the driver tells a hung worker (SIGSTOP, a frozen node) from a busy one.

threading.Thread(target=beat, args=(actor_name,), daemon=True).start()   # in the worker
Heartbeats(timeout_s=60).silent([actor_name, ...])                        # in the driver
"""

from __future__ import annotations

import contextlib
import os
import time

# A worker's heartbeat: a counter it bumps in Ray's internal KV from a thread of its own, so it
# beats while its main thread computes or waits in a collective, and stops when the process is
# stopped (SIGSTOP), frozen or gone. The driver judges a worker by whether the counter moves,
# on its own clock (nodes' clocks may differ).
HEARTBEAT_S = 2.0
HEARTBEATS = "eopd-heartbeat"  # the KV namespace


def beat(key: str) -> None:
    from ray.experimental import internal_kv

    count, me = 0, os.getpid()
    while True:
        count += 1
        # The pid too: a restarted worker (same actor name) must never repeat the value its
        # dead predecessor left, or it would look silent since that one stopped.
        with contextlib.suppress(Exception):  # the GCS restarting, the driver gone: keep trying
            internal_kv._internal_kv_put(key, f"{me}:{count}", overwrite=True, namespace=HEARTBEATS)
        time.sleep(HEARTBEAT_S)


class Heartbeats:
    """The driver's view of its workers' heartbeats: which ones stopped beating."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._seen: dict[str, tuple[bytes | None, float]] = {}  # name -> (count, when it moved)

    def silent_for(self, name: str) -> float:
        """Seconds since `name`'s counter last moved (0 until it has beaten once)."""
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(name, namespace=HEARTBEATS)
        now = time.monotonic()
        last, since = self._seen.get(name, (None, now))
        if value is None or value != last:
            self._seen[name] = (value, now)
            return 0.0
        return now - since

    def silent(self, names: list[str]) -> list[str]:
        return [n for n in names if self.silent_for(n) > self.timeout_s]
