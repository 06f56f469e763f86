"""SIGTERM (`ray job stop`, Kubernetes pod deletion): what the driver does with it.

Before the first step (`exit_on_sigterm`, installed first thing by jobs/distill.py): exit at
once with a plain message, nothing to save; directories being built then (`removed_if_stopped`)
are deleted first.
During the loop (`StopOnSigterm`): finish the current step, checkpoint, stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading

from eopd_ray.building import directories_being_built


class StopOnSigterm:
    """SIGTERM (what `ray job stop` and Kubernetes send) asks the loop to checkpoint after the
    current step and stop, instead of dying mid-step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
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
    _stop_embedded_ray()
    os._exit(143)


def _stop_embedded_ray() -> None:
    """The processes of a Ray this driver started itself (none when it joined a cluster):
    os._exit would leave its agents running."""
    ray = sys.modules.get("ray")
    if ray is None:  # stopped before Ray was even imported (e.g. while preparing toy models)
        return
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None:
        node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)


def exit_on_sigterm() -> None:
    """Until the loop runs, SIGTERM ends start-up at once with a plain message (Ray's own driver
    handler raises SystemExit inside whatever call is running: a stack dump)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_start_up)
