"""Weight versions: after every step the learner's weights go to every rollout worker, and the
driver checks that each engine holds exactly what was sent before it counts the new version.

    _sync(step)              push version v + 1, redone after a rollout worker restarted
    _push_weights(v, what)   send, receive, compare checksums (confirm), probe log-probs

A rollout worker lost in the middle of a collective broadcast leaves the others waiting in it:
`_abandon_broadcast` frees them, and the sync is redone once Ray has restarted the workers.

Part of `Pipeline` (its base class).
"""

from __future__ import annotations

import contextlib

import ray

from eopd_ray.core.invariants import check_weights_in_sync, check_weights_loaded, logprob_gap_bound
from eopd_ray.driver.actors import WorkerError


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
        timeout = self.cfg.sync.timeout_s
        if self.cfg.sync.transport == "collective":
            sends = self.learner.call_async("broadcast_weights")
            receives = self.rollout.call_async("receive_weights", new_version)
        else:
            sends = self.learner.call_async("weight_buckets")
            receives = self.rollout.call_async("load_weights", sends[0], new_version)
        try:
            self.rollout.get(receives, timeout, f"{what} weight sync (receive)")
        except WorkerError as exc:
            if exc.died and self.cfg.sync.transport == "collective":
                self._abandon_broadcast(sends, receives)
            raise
        self.learner.get(sends, timeout, f"{what} weight sync (send)")
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
        check_weights_loaded(
            sent, confirmed, [str(i) for i in self.rollout.identities], new_version, what
        )
        self.version = new_version
        self._check_weights_in_sync(what)

    def _abandon_broadcast(self, sends: list, receives: list) -> None:
        """A rollout worker was lost in the middle of a collective broadcast: the others would
        wait in it for a peer that is gone, up to `sync.timeout_s`. The rollout workers still
        inside it are killed (Ray restarts them; the redone sync reloads every engine), which
        ends the learner's send too; every call's outcome is collected, so no "Unhandled error"
        is left behind for Ray to log."""
        _, inside = ray.wait(receives, num_returns=len(receives), timeout=0)
        for rank, ref in enumerate(receives):
            if ref in inside:
                ray.kill(self.rollout.handles[rank], no_restart=False)
        calls = sends + receives
        ray.wait(calls, num_returns=len(calls), timeout=self.cfg.run.worker_timeout_s)
        for ref in calls:
            with contextlib.suppress(Exception):
                ray.get(ref, timeout=0)

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
