"""Weight versions: after every step the learner's weights go to every rollout worker, and the
driver checks that each engine holds exactly what was sent before it counts the new version.

    weights = WeightVersions(cfg, groups, state, probe_ids)
    weights.push(v, what)    send, receive, compare checksums (confirm), probe log-probs; then
                             state.version = v
    weights.sync_parts       where the pushes' time went since the last reset (sync/<part>_s)

A rollout worker lost in the middle of a collective broadcast leaves the others waiting in it:
`_abandon_broadcast` cancels them, and the caller redoes the push once Ray has restarted the
worker (`Recovery.recovering`). One that crashed between calls (a fresh process, in no group) is
found before the broadcast starts and the group formed again; a learner lost while idle breaks
its receivers' connections: a learner loss, not a rollout failure.
"""

from __future__ import annotations

import logging
import time

from eopd_ray.config import Config
from eopd_ray.core.invariants import (
    WeightsOutOfSync,
    check_weights_in_sync,
    check_weights_loaded,
    logprob_gap_bound,
)
from eopd_ray.driver.actors import WorkerError, call_died
from eopd_ray.driver.cancelling import cancel_calls
from eopd_ray.driver.run_state import RunState
from eopd_ray.driver.worker_groups import WorkerGroups

log = logging.getLogger(__name__)


class _PartClock:
    """Wall time between laps, added to `parts[name]`."""

    def __init__(self, parts: dict[str, float]) -> None:
        self.parts, self.last = parts, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.add(name, now - self.last)
        self.last = now

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds


class WeightVersions:
    """Pushes the learner's weights to the rollout engines and confirms what they hold (see the
    module docstring). Sets `state.version` once a version is confirmed and probed."""

    def __init__(
        self, cfg: Config, groups: WorkerGroups, state: RunState, probe_ids: list[int]
    ) -> None:
        self.cfg, self.groups, self.state, self.probe_ids = cfg, groups, state, probe_ids
        self.sync_parts: dict[str, float] = {}  # where the pushes went (the step's sync/*_s)
        self.groups_reformed = 0  # weight-sync groups formed again around restarted workers

    def push(self, new_version: int, what: str) -> None:
        """Send, receive, confirm the checksums, probe. Each part's wall time is added to
        `sync_parts` (the step's `sync/<part>_s` metrics: where a sync's time goes)."""
        timeout = self.cfg.sync.timeout_s
        clock = _PartClock(self.sync_parts)
        rollout, learner = self.groups.rollout, self.groups.learner
        if self.cfg.sync.transport == "collective":
            self._rejoin_replaced_workers(what)
            clock.lap("who")
            sends = learner.call_async("broadcast_weights")
            receives = rollout.call_async("receive_weights", new_version)
        else:
            sends = learner.call_async("weight_buckets")
            receives = rollout.call_async("load_weights", sends[0], new_version)
        try:
            received = rollout.get(receives, timeout, f"{what} weight sync (receive)")
        except WorkerError as exc:
            if self.cfg.sync.transport == "collective":
                self._abandon_broadcast(sends, receives)
            self._blame_lost_learner(sends, what, exc)
            raise
        sent = learner.get(sends, timeout, f"{what} weight sync (send)")
        clock.lap("transfer")  # gather + checksum, send, receive + reload + read-back checksum
        # Inside the transfer (the slowest engine's, learner rank 0's): not added to the step.
        # The slowest engine's load split into its parts (receive + reload + cache reset).
        slowest = max((times for _, times in received), key=lambda times: times["load_s"])
        for part in ("load", "receive", "reload", "cache_reset"):
            clock.add(f"engine_{part}", slowest[f"{part}_s"])
        clock.add("engine_checksum", max(times["checksum_s"] for _, times in received))
        if isinstance(sent[0], dict):  # collective: rank 0's own account
            clock.add("learner_checksum", sent[0]["checksum_s"])
            clock.add("learner_send", sent[0]["send_s"])
        # What every engine holds, read back and checksummed, against what the learner sent:
        # a worker takes the new version number only when they are equal.
        sent = learner.get(
            learner.call_async("sent_weights_checksum", ranks=[0]),
            timeout,
            f"{what} weight sync (checksum)",
            ranks=[0],
        )[0]
        confirmed = rollout.get(
            rollout.call_async("confirm_weights", new_version, sent),
            timeout,
            f"{what} weight sync (confirm)",
        )
        try:
            check_weights_loaded(
                sent, confirmed, [str(i) for i in rollout.identities], new_version, what
            )
        except WeightsOutOfSync as exc:
            self.blame_replaced_workers(f"{what} weight sync (confirm)", exc)
            raise
        clock.lap("confirm")
        self.state.version = new_version
        self._check_weights_in_sync(what)
        clock.lap("probe")

    def _rejoin_replaced_workers(self, what: str) -> None:
        """A rollout worker that crashed between calls is a fresh process Ray restarted: it is
        in no weight-sync group, and a broadcast would wait for it. Seen here, before any
        broadcast starts, it is one cheap call per worker; the group is formed again."""
        rollout = self.groups.rollout
        fresh = rollout.replaced(self.cfg.sync.timeout_s, f"{what} weight sync (who)")
        if fresh:
            log.warning(
                "%s: rollout worker(s) %s were restarted since the last call; forming the "
                "weight-sync group again",
                what,
                ", ".join(str(rollout.identities[r]) for r in fresh),
            )
            self.groups.join_sync_group()
            self.groups_reformed += 1

    def blame_replaced_workers(self, what: str, exc: Exception) -> None:
        """A check failed (a version or checksum that is not the expected one). If rollout
        workers were restarted meanwhile (fresh processes hold the initial weights), that is
        why: raise it as their loss, which the caller recovers from; otherwise return."""
        rollout = self.groups.rollout
        fresh = rollout.replaced(self.cfg.run.step_timeout_s, f"{what} (who)")
        if fresh:
            who = ", ".join(str(rollout.identities[r]) for r in fresh)
            raise WorkerError(
                f"{what}: rollout worker(s) {who} were restarted since the last weight sync "
                f"({exc})",
                died=True,
                role="rollout",
            ) from exc

    def _blame_lost_learner(self, sends: list, what: str, exc: WorkerError) -> None:
        """The receivers failed because the sender is gone (a learner lost while idle: its
        peers' connections break): that is a learner loss, which restarts the learner group,
        not a rollout failure, which would stop the run."""
        if exc.role == "learner" or not any(call_died(ref) for ref in sends):
            return
        raise WorkerError(
            f"{what} weight sync: a learner rank was lost ({exc})", died=True, role="learner"
        ) from exc

    def _abandon_broadcast(self, sends: list, receives: list) -> None:
        """A rollout worker was lost in the middle of a collective broadcast: the others and
        learner rank 0 would wait in it for a peer that is gone, up to `sync.timeout_s` (gloo
        notices a peer lost between buckets only then). Every call still in it is cancelled:
        the ends poll for that between buckets and give up within a fraction of a second (a
        rollout engine keeps its old version; the redone sync reloads everything). A rollout
        worker that does not end by `run.worker_timeout_s` is killed (Ray restarts it). Every
        call's outcome is collected, so no "Unhandled error" is left behind for Ray to log."""
        receivers = self.groups.rollout.handles[: len(receives)]
        cancel_calls(
            sends + receives,
            [None] * len(sends) + receivers,  # learners: never killed
            self.cfg.run.worker_timeout_s,
            "weight broadcast",
        )

    def _check_weights_in_sync(self, what: str) -> None:
        """Every rollout engine scores the probe sequence; the learner scores it too. Different
        log-probs mean the engines do not hold the learner's weights: stop, naming the worker."""
        timeout = self.cfg.sync.timeout_s
        rollout, learner = self.groups.rollout, self.groups.learner
        learner_refs = learner.call_async("token_logprobs", self.probe_ids)
        rollout_refs = rollout.call_async("token_logprobs", self.probe_ids)
        scored = rollout.get(rollout_refs, timeout, f"{what} weight-sync probe")
        expected = learner.get(learner_refs, timeout, f"{what} weight-sync probe")[0]
        check_weights_in_sync(
            expected,
            [lp for _, lp in scored],
            [
                f"{ident} (weight version {v})"
                for ident, (v, _) in zip(rollout.identities, scored, strict=True)
            ],
            logprob_gap_bound(self.cfg),
            what,
        )
