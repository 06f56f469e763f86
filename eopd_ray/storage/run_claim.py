"""One driver per run directory: a claim (`owner.json`) renewed by a heartbeat.

    claim = RunClaim.acquire(store, heartbeat_s=15.0)   # RunDirectoryInUse while another's is live
    claim.start()                                       # renew it in a background thread
    claim.check("before the checkpoint of step 12")     # ClaimLost when another driver took over
    claim.release()

Why: two drivers on one `run.output_dir` (a seed sweep that forgot to change it, a job
resubmitted while its old driver still runs) adopt each other's run id, delete each other's
in-flight checkpoints as incomplete and replace `metrics.jsonl` under the other's open handle.
The claim records an owner token, the host (its name, its boot id and the pid namespace of the
driver), the pid (and its start time) and a heartbeat time. A claim is live while its heartbeat
is younger than 4 x `run.claim_heartbeat_s`, unless it was made in this very pid namespace of
this very boot by a process that is gone (a resubmission on the same head after `ray job stop` or
a crash does not wait for the expiry). A host name alone says nothing: containers with host
networking (Docker, Kubernetes `hostNetwork`) share it while each has its own pids, so a pid
that looks dead here may be a live driver next door: there, only the heartbeat's age counts.
Claims written before the boot id and namespace were recorded are judged by heartbeat age
only. On an object store there is no create-if-absent, so acquiring
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
from pathlib import Path

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


def _boot_id() -> str | None:
    """This machine's boot id (new at every boot, differs between machines), None off Linux."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> int | None:
    """The inode of this process's pid namespace: pids are comparable only within one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _host_identity() -> dict:
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace()}


def _same_pid_space(record: dict) -> bool:
    """Whether `record`'s pid means a process this one can look up: same host name, same boot,
    same pid namespace. Unknown (a claim from before these were recorded, or no /proc) is no."""
    mine = _host_identity()
    return (
        mine["boot_id"] is not None
        and mine["pid_ns"] is not None
        and all(record.get(key) == value for key, value in mine.items())
    )


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
            **_host_identity(),
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

    def _period(self, record: dict) -> float:
        return float(record.get("heartbeat_s") or self.heartbeat_s)

    def _age(self, record: dict, now: float) -> float:
        return now - float(record.get("heartbeat", 0.0))

    def _own(self, record: dict) -> bool:
        """An earlier, unreleased claim of this very process (not a judgment of liveness)."""
        return _same_pid_space(record) and int(record.get("pid", -1)) == os.getpid()

    def holder_gone(self, record: dict) -> bool:
        """Whether the process that wrote `record` is provably gone: only when its pid can be
        looked up here (`_same_pid_space`)."""
        if not _same_pid_space(record):
            return False
        started = _process_started(int(record.get("pid", -1)))
        return started is None or (
            record.get("pid_started") is not None
            and abs(started - float(record["pid_started"])) > 1.0
        )  # that process is gone (or its pid was reused)

    def is_live(self, record: dict, now: float | None = None) -> bool:
        """Whether `record` (another driver's claim) still holds the directory."""
        now = time.time() if now is None else now
        age, period = self._age(record, now), self._period(record)
        if age > STALE_AFTER_HEARTBEATS * period or self._own(record):
            return False
        # A pid is judged only where it means something (this boot, this pid namespace) and
        # with its start time (a reused pid is not the holder): otherwise the heartbeat decides.
        return not self.holder_gone(record)

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
            "last heartbeat (sooner for a process gone from this host and pid namespace): submit "
            f"again then, or delete {self.store.show(CLAIM)} once you are sure it no longer runs"
        )

    def _take(self) -> None:
        current = self._read()
        if current is not None and current.get("owner") != self.token:
            if self.is_live(current):
                raise self._refuse(current)
            why = "its process is gone" if self.holder_gone(current) else "its claim expired"
            log.warning(
                "taking over %s from %s (%s)",
                self.store.uri,
                _describe(current, time.time()),
                "an earlier claim of this process" if self._own(current) else why,
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
