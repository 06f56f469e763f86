"""Recovery from a lost rollout or teacher worker: Ray restarts it, the driver brings it back in
sync and redoes the work, with the same prompts and seeds, so nothing is lost or done twice.

    _recovering(group, work, what)  run work(); after a death: refresh, rejoin, catch up, redo
    _rollout_with_recovery(step)    the step's batch, regenerated from the same prompts if needed
    _prefetch_next / _finish_prefetch   rollout.async_lag: the next step's rollout, dropped (not
                                        redone) when its worker died

Learner ranks hold optimizer state and are not restarted (docs/reliability.md). Part of
`Pipeline` (its base class).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from eopd_ray.core.wire import RolloutBatch
from eopd_ray.driver.actors import ActorGroup, WorkerError

if TYPE_CHECKING:
    from eopd_ray.driver.pipeline import PendingRollout

log = logging.getLogger(__name__)


class Recovery:
    """Worker-loss recovery for `Pipeline` (see the module docstring)."""

    def _recovering(self, group: ActorGroup, work, what: str, catch_up: bool = True):
        """Run `work()`; if a worker of `group` died, wait for Ray to restart it, bring it back
        in sync (rollout: rejoin the weight group and, if `catch_up`, reload the current
        weights), and redo the work, up to `run.max_worker_restarts` times."""
        for attempt in range(self.cfg.run.max_worker_restarts + 1):
            try:
                return work()
            except WorkerError as exc:
                if not exc.died or attempt == self.cfg.run.max_worker_restarts:
                    raise
                log.warning("%s: %s; restarting and redoing it", what, exc)
                group.refresh_identities(self.cfg.run.step_timeout_s)
                if group is self.rollout:
                    if self.cfg.sync.transport == "collective":
                        self._join_sync_group()
                    if catch_up:
                        self._push_weights(self.version, f"{what} recovery")
                self.num_recoveries += 1

    def _rollout_with_recovery(self, step: int, pending: PendingRollout | None) -> RolloutBatch:
        """The step's batch: the prefetched one when there is one, else generated now. After a
        rollout worker died it is generated again from the same prompts and seeds."""
        stream_state = pending.stream_state if pending else self.stream.state_dict()

        def rollout() -> RolloutBatch:
            nonlocal pending
            if pending is not None:  # first attempt: the prefetch; a redo generates afresh
                launched, pending = pending, None
                return self._collect_rollout(launched)
            self.stream.load_state_dict(stream_state)  # a redo takes the same prompts
            return self._collect_rollout(self._launch_rollout(step))

        return self._recovering(self.rollout, rollout, f"step {step} rollout")

    def _prefetch_next(self, step: int) -> None:
        """rollout.async_lag = 1: start step+1's rollout now, on the current weights, so that it
        runs while this step trains."""
        if self.cfg.rollout.async_lag and step + 1 < self.cfg.run.steps:
            self._prefetched = self._launch_rollout(step + 1)

    def _finish_prefetch(self, step: int) -> None:
        """Wait for the prefetched rollout before the weight sync (a worker takes one call at a
        time). If a rollout worker died, the prefetch is dropped rather than redone: the learner
        has already moved past the weights it was launched on, so a redo would sample with newer
        weights under the old version's label. Ray restarts the worker, the sync that follows
        gives it the new weights, and the next step samples the same prompts on them."""
        pending = self._prefetched
        if pending is None:
            return
        try:
            self._wait_rollout(pending)
        except WorkerError as exc:
            if not exc.died:
                raise
            log.warning("step %d rollout (prefetched): %s; dropping it", pending.step, exc)
            self._prefetched = None
            self.stream.load_state_dict(pending.stream_state)  # the next step takes its prompts
            self.rollout.refresh_identities(self.cfg.run.step_timeout_s)
            if self.cfg.sync.transport == "collective":
                self._join_sync_group()
            self.num_recoveries += 1
