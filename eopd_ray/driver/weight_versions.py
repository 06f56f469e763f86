"""Weight versions: after every step the learner's weights go to every rollout worker, and the
driver checks that each engine holds exactly what was sent before it counts the new version.

    _sync(step)              push version v + 1, redone after a rollout worker restarted
    _push_weights(v, what)   send, receive, compare checksums (confirm), probe log-probs

A rollout worker lost in the middle of a collective broadcast leaves the others waiting in it:
`_abandon_broadcast` cancels them, and the sync is redone once Ray has restarted the worker. One
that crashed between calls (a fresh process, in no group) is found before the broadcast starts
and the group formed again; a learner lost while idle breaks its receivers' connections: a
learner loss, not a rollout failure.

Part of `Pipeline` (its base class).
"""

from __future__ import annotations

import logging
import time

from eopd_ray.core.invariants import (
    WeightsOutOfSync,
    check_weights_in_sync,
    check_weights_loaded,
    logprob_gap_bound,
)
from eopd_ray.driver.actors import WorkerError, call_died
from eopd_ray.driver.cancelling import cancel_calls

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
    """Weight sync and its checks for `Pipeline` (see the module docstring)."""

    def _sync(self, step: int) -> None:
        """Send the new weights to every rollout worker; all must report version v + 1.
        Rollout workers lost while the teacher or the learners worked (their node went down)
        are first seen here: once Ray has restarted them, the sync is redone, to the same
        version (the probe may have failed after the workers took v + 1)."""
        new_version = self.version + 1
        self._recovering(
            self.rollout,
            lambda: self._push_weights(new_version, f"step {step}"),
            f"step {step} weight sync",
            catch_up=False,  # the redone sync is the catch-up
        )

    def _push_weights(self, new_version: int, what: str) -> None:
        """Send, receive, confirm the checksums, probe. Each part's wall time is added to
        `self.sync_parts` (the step's `sync/<part>_s` metrics: where a sync's time goes)."""
        timeout = self.cfg.sync.timeout_s
        clock = _PartClock(self.sync_parts)
        if self.cfg.sync.transport == "collective":
            self._rejoin_replaced_workers(what)
            clock.lap("who")
            sends = self.learner.call_async("broadcast_weights")
            receives = self.rollout.call_async("receive_weights", new_version)
        else:
            sends = self.learner.call_async("weight_buckets")
            receives = self.rollout.call_async("load_weights", sends[0], new_version)
        try:
            received = self.rollout.get(receives, timeout, f"{what} weight sync (receive)")
        except WorkerError as exc:
            if self.cfg.sync.transport == "collective":
                self._abandon_broadcast(sends, receives)
            self._blame_lost_learner(sends, what, exc)
            raise
        sent = self.learner.get(sends, timeout, f"{what} weight sync (send)")
        clock.lap("transfer")  # gather + checksum, send, receive + reload + read-back checksum
        # Inside the transfer (the slowest engine's, learner rank 0's): not added to the step.
        clock.add("engine_load", max(times["load_s"] for _, times in received))
        clock.add("engine_checksum", max(times["checksum_s"] for _, times in received))
        if isinstance(sent[0], dict):  # collective: rank 0's own account
            clock.add("learner_checksum", sent[0]["checksum_s"])
            clock.add("learner_send", sent[0]["send_s"])
        # What every engine holds, read back and checksummed, against what the learner sent:
        # a worker takes the new version number only when they are equal.
        sent = self.learner.get(
            self.learner.call_async("sent_weights_checksum", ranks=[0]),
            timeout,
            f"{what} weight sync (checksum)",
            ranks=[0],
        )[0]
        confirmed = self.rollout.get(
            self.rollout.call_async("confirm_weights", new_version, sent),
            timeout,
            f"{what} weight sync (confirm)",
        )
        try:
            check_weights_loaded(
                sent, confirmed, [str(i) for i in self.rollout.identities], new_version, what
            )
        except WeightsOutOfSync as exc:
            self._blame_replaced_workers(f"{what} weight sync (confirm)", exc)
            raise
        clock.lap("confirm")
        self.version = new_version
        self._check_weights_in_sync(what)
        clock.lap("probe")

    def _rejoin_replaced_workers(self, what: str) -> None:
        """A rollout worker that crashed between calls is a fresh process Ray restarted: it is
        in no weight-sync group, and a broadcast would wait for it. Seen here, before any
        broadcast starts, it is one cheap call per worker; the group is formed again."""
        fresh = self.rollout.replaced(self.cfg.sync.timeout_s, f"{what} weight sync (who)")
        if fresh:
            log.warning(
                "%s: rollout worker(s) %s were restarted since the last call; forming the "
                "weight-sync group again",
                what,
                ", ".join(str(self.rollout.identities[r]) for r in fresh),
            )
            self._join_sync_group()
            self.num_recoveries += 1

    def _blame_replaced_workers(self, what: str, exc: Exception) -> None:
        """A check failed (a version or checksum that is not the expected one). If rollout
        workers were restarted meanwhile (fresh processes hold the initial weights), that is
        why: raise it as their loss, which the caller recovers from; otherwise return."""
        fresh = self.rollout.replaced(self.cfg.run.step_timeout_s, f"{what} (who)")
        if fresh:
            who = ", ".join(str(self.rollout.identities[r]) for r in fresh)
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
        cancel_calls(
            sends + receives,
            [None] * len(sends) + self.rollout.handles[: len(receives)],  # learners: never killed
            self.cfg.run.worker_timeout_s,
            "weight broadcast",
        )

    def _check_weights_in_sync(self, what: str) -> None:
        """Every rollout engine scores the probe sequence; the learner scores it too. Different
        log-probs mean the engines do not hold the learner's weights: stop, naming the worker."""
        timeout = self.cfg.sync.timeout_s
        learner_refs = self.learner.call_async("token_logprobs", self.probe_ids)
        rollout_refs = self.rollout.call_async("token_logprobs", self.probe_ids)
        scored = self.rollout.get(rollout_refs, timeout, f"{what} weight-sync probe")
        expected = self.learner.get(learner_refs, timeout, f"{what} weight-sync probe")[0]
        check_weights_in_sync(
            expected,
            [lp for _, lp in scored],
            [
                f"{ident} (weight version {v})"
                for ident, (v, _) in zip(self.rollout.identities, scored, strict=True)
            ],
            logprob_gap_bound(self.cfg),
            what,
        )
