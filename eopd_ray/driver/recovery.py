"""Recovery from a lost rollout or teacher worker: Ray restarts it, the driver brings it back in
sync and redoes the work, with the same prompts and seeds, so nothing is lost or done twice.

    _recovering(group, work, what)  run work(); after a death: refresh, rejoin, catch up, redo
    _rollout_with_recovery(step)    the step's batch, regenerated from the same prompts if needed
    _prefetch_next / _finish_prefetch   rollout.async_lag: the next step's rollout, dropped (not
                                        redone) when its worker died

A lost learner rank (`_restart_learners`): the learner group is replaced and the run goes back
to its newest complete checkpoint, up to `run.max_failures` times. Part of `Pipeline` (its base
class).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import ray

from eopd_ray.core.wire import RolloutBatch
from eopd_ray.driver.actors import ActorGroup, WorkerError
from eopd_ray.driver.cancelling import cancel_calls
from eopd_ray.storage import checkpoint

if TYPE_CHECKING:
    from eopd_ray.driver.pipeline import PendingRollout
    from eopd_ray.telemetry.timeline import Timeline

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
                other_role = exc.role is not None and exc.role != group.role
                if not exc.died or other_role or attempt == self.cfg.run.max_worker_restarts:
                    raise
                log.warning("%s: %s; restarting and redoing it", what, exc)
                group.refresh_identities(self.cfg.run.step_timeout_s)
                if group is self.rollout:
                    if self.cfg.sync.transport == "collective":
                        self._join_sync_group()
                    if catch_up:
                        self._push_weights(self.version, f"{what} recovery")
                self.num_recoveries += 1

    def _rollout_with_recovery(
        self, step: int, pending: PendingRollout | None, timeline: Timeline
    ) -> RolloutBatch:
        """The step's batch: the prefetched one when there is one, else generated now. After a
        rollout worker died it is generated again from the same prompts and seeds."""
        stream_state = pending.stream_state if pending else self.stream.state_dict()

        def rollout() -> RolloutBatch:
            nonlocal pending
            if pending is not None:  # first attempt: the prefetch; a redo generates afresh
                launched, pending = pending, None
            else:
                self.stream.load_state_dict(stream_state)  # a redo takes the same prompts
                launched = self._launch_rollout(step)
            batch = self._collect_rollout(launched)
            for rank, (start, end) in enumerate(launched.times):
                timeline.add(f"rollout-{rank}", "generate", start, end)
            return batch

        return self._recovering(self.rollout, rollout, f"step {step} rollout")

    def _prefetch_next(self, step: int) -> None:
        """rollout.async_lag = 1: start step+1's rollout now, on the current weights, so that it
        runs while this step trains."""
        if not (self.cfg.rollout.async_lag and step + 1 < self.cfg.run.steps):
            return
        if self.cfg.rollout.stream:  # rolled out and scored in a driver thread while training
            self._prefetched = self._prefetch_stream(step + 1)
        else:
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
            if pending.background is not None:
                pending.streamed = pending.background.result()
            else:
                self._wait_rollout(pending)
        except WorkerError as exc:
            if not exc.died or exc.role not in (None, "rollout"):
                raise
            log.warning("step %d rollout (prefetched): %s; dropping it", pending.step, exc)
            self._prefetched = None
            self.stream.load_state_dict(pending.stream_state)  # the next step takes its prompts
            self.rollout.refresh_identities(self.cfg.run.step_timeout_s)
            if self.cfg.sync.transport == "collective":
                self._join_sync_group()
            self.num_recoveries += 1

    def _cancel_prefetch(self) -> None:
        """Drop the prefetched rollout, its generations cancelled and waited for: left running,
        the restarted learners' rejoin and weight push would queue behind them on the rollout
        workers (minutes at the paper's scale) and time out."""
        pending, self._prefetched = self._prefetched, None
        if pending is None:
            return
        timeout = self.cfg.run.worker_timeout_s
        if pending.background is not None:
            pending.background.cancel(timeout)
            return
        workers = self.rollout.handles[: len(pending.refs)]
        cancel_calls(pending.refs, workers, timeout, f"step {pending.step} rollout (prefetched)")

    def _respawn_learners(self, from_step: int, exc: WorkerError) -> None:
        """Replace the learner group and set it up. A group lost while it starts (its bundles
        were still on a node not yet declared dead: Ray moves them once it is) is another
        learner loss, counted against run.max_failures, and is replaced again."""
        run = self.cfg.run
        while True:
            for handle in self.learner.handles:
                ray.kill(handle)
            self.learner = self._spawn_learners(from_step, attempt=self.learner_failures)
            try:
                self.learner.get(
                    self._set_up_learners_async(), run.step_timeout_s, "learner restart"
                )
                return
            except WorkerError as again:
                if not again.died:
                    raise
                self.learner_failures += 1
                if 0 <= run.max_failures < self.learner_failures:
                    raise WorkerError(
                        f"{exc}; then the new learner group was lost while starting ({again}); "
                        f"learner lost {self.learner_failures} times, run.max_failures = "
                        f"{run.max_failures}: stopping",
                        died=True,
                        role="learner",
                    ) from again
                log.warning("the new learner group was lost while starting (%s); again", again)

    def _restart_learners(self, step: int, exc: WorkerError) -> int:
        """A learner rank was lost during `step`. The whole learner group is replaced (a
        DeepSpeed group cannot take in a new rank): new ranks load the newest complete
        checkpoint (the initial weights when there is none), the rollout workers get those
        weights (checked as after any sync), and the prompt stream and the driver's RNG go back
        to that checkpoint. Returns the step to go on from; the caller rewinds the metrics."""
        run = self.cfg.run
        self.learner_failures += 1
        ckpt = checkpoint.latest(self.store)
        where = f"the newest checkpoint is {ckpt.uri}" if ckpt else "no checkpoint yet"
        if 0 <= run.max_failures < self.learner_failures:
            raise WorkerError(
                f"{exc}; learner lost {self.learner_failures} times, run.max_failures = "
                f"{run.max_failures}: stopping ({where}; submit again to resume from it)",
                died=exc.died,
                role=exc.role,
            ) from exc
        started = time.monotonic()
        from_step = ckpt.step + 1 if ckpt else 0
        log.warning(
            "step %d: %s; restarting the learner group from %s (learner loss %d of "
            "run.max_failures = %d)",
            step,
            exc,
            ckpt.uri if ckpt else "the initial weights",
            self.learner_failures,
            run.max_failures,
        )
        self._cancel_prefetch()  # sampled with weights the run is going back from
        self._uploading = None  # never committed: its files may be incomplete
        self._respawn_learners(from_step, exc)
        if self.cfg.sync.transport == "collective":
            self._join_sync_group()
        self._check_learners_see_storage()
        if ckpt is not None:
            self.learner.get(
                self.learner.call_async("load_checkpoint", self.store, ckpt.rel),
                run.step_timeout_s,
                f"loading {ckpt.uri}",
            )
            self.stream.load_state_dict(ckpt.stream)
            checkpoint.restore_rng(ckpt)
        else:
            self.stream.load_state_dict(self._initial_stream)
            checkpoint.set_rng_state(self._initial_rng)
        self._recovering(
            self.rollout,
            lambda: self._push_weights(ckpt.weight_version if ckpt else 0, "learner restart"),
            "learner restart weight sync",
            catch_up=False,
        )
        self.num_recoveries += 1
        log.warning(
            "learner group restarted in %.1fs; going on from step %d",
            time.monotonic() - started,
            from_step,
        )
        return from_step
