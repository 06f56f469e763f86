"""One driver per run directory: a claim (`owner.json`) renewed by a heartbeat.

    claim = RunClaim.acquire(store, heartbeat_s=15.0)   # RunDirectoryInUse while another's is live
    claim.start()                                       # renew it in a background thread
    claim.check("before the checkpoint of step 12")     # ClaimLost when another driver took over
    claim.release()

Why: two drivers on one `run.output_dir` (a seed sweep that forgot to change it, a job
resubmitted while its old driver still runs) adopt each other's run id, delete each other's
in-flight checkpoints as incomplete and replace `metrics.jsonl` under the other's open handle.
The claim records an owner token, the host, the pid (and its start time) and a heartbeat time.
A claim is live while its heartbeat is younger than 4 x `run.claim_heartbeat_s`, unless it was
made on this host by a process that is gone (a resubmission on the same head after `ray job
stop` or a crash does not wait). On an object store there is no create-if-absent, so acquiring
writes the claim, waits `SETTLE_S` and reads it back: of two drivers racing, the one whose write
landed last wins and the other refuses. Each renewal reads the claim first; a driver that finds
another's claim stops at its next `check` (every step, and before a checkpoint is committed)
and never writes it back. The heartbeat compares wall clocks of two hosts: keep them in NTP sync.

Imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time

from eopd_ray.errors import EopdError
from eopd_ray.storage.run_storage import RunStorage

log = logging.getLogger(__name__)

CLAIM = "owner.json"
STALE_AFTER_HEARTBEATS = 4
SETTLE_S = 0.5  # between writing a claim and reading it back (object stores: no O_EXCL)


class RunDirectoryInUse(EopdError):
    """Another live driver owns the run directory."""


class ClaimLost(EopdError):
    """Another driver took the run directory over while this one was running."""


def _process_started(pid: int) -> float | None:
    """The start time of process `pid` on this host, None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _describe(record: dict, now: float) -> str:
    age = now - float(record.get("heartbeat", 0.0))
    return (
        f"run {record.get('run_id') or '(starting)'} on host {record.get('host')} "
        f"(pid {record.get('pid')}), last heartbeat {age:.0f} s ago"
    )


class RunClaim:
    def __init__(self, store: RunStorage, heartbeat_s: float, run_id: str | None = None) -> None:
        self.store, self.heartbeat_s, self.run_id = store, heartbeat_s, run_id
        self.token = secrets.token_hex(8)
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # renewals from the heartbeat thread and set_run_id

    # --- the record ------------------------------------------------------------------------------

    def _record(self) -> dict:
        pid = os.getpid()
        return {
            "owner": self.token,
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": pid,
            "pid_started": _process_started(pid),
            "heartbeat": time.time(),
            "heartbeat_s": self.heartbeat_s,
        }

    def _read(self) -> dict | None:
        try:
            text = self.store.read_text(CLAIM)
        except FileNotFoundError:
            return None
        except OSError:
            if not self.store.exists(CLAIM):
                return None
            raise
        try:
            return json.loads(text)
        except ValueError:
            log.warning("%s does not parse: treated as no claim", self.store.show(CLAIM))
            return None

    def _write(self) -> None:
        self.store.write_text(CLAIM, json.dumps(self._record()))

    def is_live(self, record: dict, now: float | None = None) -> bool:
        """Whether `record` (another driver's claim) still holds the directory."""
        now = time.time() if now is None else now
        beat = float(record.get("heartbeat_s") or self.heartbeat_s)
        if now - float(record.get("heartbeat", 0.0)) > STALE_AFTER_HEARTBEATS * beat:
            return False
        if record.get("host") == socket.gethostname():
            pid = int(record.get("pid", -1))
            if pid == os.getpid():
                return False  # an earlier, unreleased claim of this very process
            started = _process_started(pid)
            if started is None or (
                record.get("pid_started") is not None
                and abs(started - float(record["pid_started"])) > 1.0
            ):
                return False  # that process is gone (or its pid was reused)
        return True

    # --- acquiring, renewing, releasing ----------------------------------------------------------

    @classmethod
    def acquire(cls, store: RunStorage, heartbeat_s: float) -> RunClaim:
        claim = cls(store, heartbeat_s)
        claim._take()
        return claim

    def _refuse(self, record: dict) -> RunDirectoryInUse:
        grace = STALE_AFTER_HEARTBEATS * float(record.get("heartbeat_s") or self.heartbeat_s)
        return RunDirectoryInUse(
            f"run.output_dir {self.store.uri} is in use by {_describe(record, time.time())}: two "
            "drivers on one directory delete each other's checkpoints. Give this run another "
            f"run.output_dir. If that driver is dead, its claim expires {grace:.0f} s after its "
            f"last heartbeat (at once for a process gone on the same host): submit again then, "
            f"or delete {self.store.show(CLAIM)} once you are sure it no longer runs"
        )

    def _take(self) -> None:
        current = self._read()
        if current is not None and current.get("owner") != self.token and self.is_live(current):
            raise self._refuse(current)
        if current is not None and current.get("owner") != self.token:
            log.warning(
                "taking over %s from %s (its claim expired)",
                self.store.uri,
                _describe(current, time.time()),
            )
        self._write()
        time.sleep(SETTLE_S)
        current = self._read()
        if current is None or current.get("owner") != self.token:
            if current is None:
                raise RunDirectoryInUse(
                    f"{self.store.show(CLAIM)} vanished right after this driver wrote it: "
                    "another process is cleaning or writing run.output_dir"
                )
            raise self._refuse(current)

    def set_run_id(self, run_id: str) -> None:
        self.run_id = run_id
        self.renew()

    def renew(self) -> None:
        """Write a fresh heartbeat, unless another driver holds the claim now."""
        with self._lock:
            if self._lost is not None:
                return
            current = self._read()
            if current is None or current.get("owner") != self.token:
                what = _describe(current, time.time()) if current else "nobody (it was deleted)"
                self._lost = f"{self.store.show(CLAIM)} now names {what}"
                log.error("run directory claim lost: %s", self._lost)
                return
            self._write()

    def start(self) -> None:
        """Renew the claim every `heartbeat_s` in a daemon thread."""

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    self.renew()
                except Exception as exc:  # a storage hiccup: the next beat retries
                    log.warning("renewing the claim on %s failed: %s", self.store.uri, exc)

        self._thread = threading.Thread(target=beat, name="run-claim", daemon=True)
        self._thread.start()

    def check(self, what: str) -> None:
        """Raise ClaimLost when another driver took the directory over."""
        if self._lost is not None:
            raise ClaimLost(
                f"{what}: this driver no longer owns run.output_dir ({self._lost}); stopping "
                "without writing anything more there. Its last complete checkpoint stays"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        try:
            current = self._read()
            if current is not None and current.get("owner") == self.token:
                self.store.delete(CLAIM)
        except OSError as exc:
            log.warning("could not release %s: %s", self.store.show(CLAIM), exc)
