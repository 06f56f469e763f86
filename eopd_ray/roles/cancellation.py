"""Whether the driver cancelled the Ray call a worker is running.

`ray.cancel` does not interrupt a running call of a plain (one-thread) actor: it sets a flag,
and the call stops where it checks it — between engine steps of a generation, between polls of
a weight broadcast. Outside a Ray task (tests, jobs calling an engine directly) nothing is ever
cancelled.
"""

from __future__ import annotations


def cancelled() -> bool:
    import ray

    if not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().is_canceled()
    except RuntimeError:  # the driver's own process, not a task
        return False
