"""SIGTERM (`ray job stop`, Kubernetes pod deletion): what the driver does with it.

Before the first step (`exit_on_sigterm`, installed first thing by jobs/distill.py): exit at
once with a plain message, nothing to save; directories being built then (`removed_if_stopped`)
are deleted first.
During the loop (`StopOnSigterm`): finish the current step, checkpoint, stop, all within
`run.stop_grace_s` of the signal (Kubernetes kills a pod 30 s after SIGTERM by default, `ray job
stop` after RAY_JOB_STOP_WAIT_TIME_S). When the step in flight and its checkpoint cannot finish
in time, the step is abandoned a few seconds before the grace ends: the driver says which step
the next run resumes at (after the newest complete checkpoint) and exits with 143.
Both exits skip the normal shutdown: what must not outlive the driver (its claim on
run.output_dir, `owner.json`) registers a cleanup with `on_abrupt_exit`, run first, within
`CLEANUP_S`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable

from eopd_ray.building import directories_being_built

# Abandoning leaves this much of the grace period to stop the embedded Ray's processes and exit.
ABANDON_MARGIN_S = 4.0
# Of that margin, what the cleanups (`on_abrupt_exit`) may take together; one that takes longer is
# left behind (a claim then expires as a crashed driver's does).
CLEANUP_S = 1.5
# Of that margin, how long the embedded Ray gets to stop its processes gracefully (its raylet then
# stops the workers); what is still alive after it is killed. The graceful stop took up to 3.4 s
# on a loaded 2-core machine: unbounded, it once ran the driver past run.stop_grace_s.
RAY_STOP_S = 1.5

_CLEANUPS: list[Callable[[], None]] = []


def on_abrupt_exit(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Run `cleanup` before a SIGTERM exit that skips the normal shutdown (an abandoned step, a
    stop during start-up). Returns the function that unregisters it (call it once the normal
    shutdown has done the same)."""
    _CLEANUPS.append(cleanup)
    return lambda: _CLEANUPS.remove(cleanup) if cleanup in _CLEANUPS else None


def _run_cleanups() -> None:
    deadline = time.monotonic() + CLEANUP_S
    for cleanup in list(_CLEANUPS):
        thread = threading.Thread(target=cleanup, daemon=True, name="sigterm cleanup")
        thread.start()
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    _CLEANUPS.clear()


class StopOnSigterm:
    """SIGTERM (what `ray job stop` and Kubernetes send) asks the loop to checkpoint after the
    current step and stop, instead of dying mid-step. With `grace_s`, a watchdog abandons the
    step if the driver is still running `grace_s - ABANDON_MARGIN_S` after the signal: it prints
    `abandoned()` (where the next run resumes) and exits with 143."""

    def __init__(
        self,
        grace_s: float | None = None,
        abandoned: Callable[[], str] = lambda: "SIGTERM: the step in flight was abandoned",
    ) -> None:
        self.requested = False
        self.grace_s, self.abandoned = grace_s, abandoned
        self.signalled_at: float | None = None
        self._previous = None
        self._watchdog: threading.Timer | None = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested, self.signalled_at = True, time.monotonic()
        if self.grace_s is not None:
            wait = max(self.grace_s - ABANDON_MARGIN_S, self.grace_s / 2)
            self._watchdog = threading.Timer(wait, self._abandon)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _abandon(self) -> None:
        try:
            message = self.abandoned()
        except Exception as exc:  # the message must not keep the driver alive past the grace
            message = f"SIGTERM: stopping without a clean stop ({exc})"
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        _run_cleanups()
        _stop_embedded_ray(RAY_STOP_S)
        os._exit(143)

    def restore(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _stop_start_up(signum, frame) -> None:
    # Exit at once: nothing is trained yet, and a Python exception cannot interrupt a blocking
    # ray.get (Ray's job stop kills the driver 3 s after SIGTERM). The workers and the placement
    # group belong to this driver: Ray removes them when it exits.
    for path in directories_being_built():
        shutil.rmtree(path, ignore_errors=True)
    sys.stderr.write(
        "stopped during start-up (SIGTERM): no step ran, nothing to resume; submit the command "
        "again to start\n"
    )
    sys.stderr.flush()
    _run_cleanups()
    _stop_embedded_ray(RAY_STOP_S)
    os._exit(143)


def _stop_embedded_ray(budget_s: float) -> None:
    """The processes of a Ray this driver started itself (none when it joined a cluster):
    os._exit would leave its agents and workers running. A graceful stop for `budget_s` (the
    raylet stops its workers), then SIGKILL for every process under this driver still alive: all
    of an embedded Ray's processes descend from the driver that started it."""
    ray = sys.modules.get("ray")
    if ray is None:  # stopped before Ray was even imported (e.g. while preparing toy models)
        return
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not node.head:
        return
    import psutil

    try:
        below = psutil.Process().children(recursive=True)
    except psutil.Error:
        below = []
    stop = threading.Thread(
        target=node.kill_all_processes,
        kwargs=dict(check_alive=False, allow_graceful=True, wait=True),
        daemon=True,
        name="ray stop",
    )
    stop.start()
    stop.join(timeout=budget_s)
    for process in below:
        with contextlib.suppress(psutil.Error):  # already gone
            process.kill()
    psutil.wait_procs(below, timeout=0.5)


def exit_on_sigterm() -> None:
    """Until the loop runs, SIGTERM ends start-up at once with a plain message (Ray's own driver
    handler raises SystemExit inside whatever call is running: a stack dump)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_start_up)
