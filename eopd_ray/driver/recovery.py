"""Recovery from a lost worker: which failure it is, and which part brings what back.

    recovery = Recovery(cfg, store, groups, weights, checkpoints, state)
    recovery.recovering(group, work, what)  run work(); after a death of one of group's workers:
                                            bring it back (`brought_back`) and redo the work,
                                            with the same prompts and seeds: nothing is lost
                                            or done twice
    recovery.restart_learners(step, exc)    a lost learner rank: a new learner group, the run
                                            back at its newest complete checkpoint

A rollout or teacher worker is restarted by Ray; the driver brings it back in sync (a rollout
worker rejoins the weight-sync group and gets the current weights). A learner rank cannot
rejoin a DeepSpeed group: the whole group is replaced, up to `run.max_failures` times.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from eopd_ray.config import Config
from eopd_ray.driver.actors import ActorGroup, WorkerError
from eopd_ray.driver.run_checkpoints import RunCheckpoints
from eopd_ray.driver.run_state import RunState
from eopd_ray.driver.weight_versions import WeightVersions
from eopd_ray.driver.worker_groups import WorkerGroups
from eopd_ray.storage import checkpoint
from eopd_ray.storage.run_storage import RunStorage

log = logging.getLogger(__name__)

T = TypeVar("T")


class Recovery:
    """Worker-loss recovery of one run (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        store: RunStorage,
        groups: WorkerGroups,
        weights: WeightVersions,
        checkpoints: RunCheckpoints,
        state: RunState,
    ) -> None:
        self.cfg, self.store, self.groups, self.weights = cfg, store, groups, weights
        self.checkpoints, self.state = checkpoints, state
        self.workers_brought_back = 0  # rollout or teacher workers, and learner groups
        self.learner_failures = 0  # learner groups replaced (run.max_failures)

    @property
    def num_recoveries(self) -> int:
        """Workers brought back, and weight-sync groups formed again around restarted ones."""
        return self.workers_brought_back + self.weights.groups_reformed

    def recovering(
        self, group: ActorGroup | None, work: Callable[[], T], what: str, catch_up: bool = True
    ) -> T:
        """Run `work()`; if a worker of `group` died, wait for Ray to restart it, bring it back
        in sync (`brought_back`), and redo the work, up to `run.max_worker_restarts` times.
        `group` None (no teacher workers: teacher.serve): nothing to restart, the work runs once
        (the served teacher's client retries a lost replica itself)."""
        if group is None:
            return work()
        for attempt in range(self.cfg.run.max_worker_restarts + 1):
            try:
                return work()
            except WorkerError as exc:
                other_role = exc.role is not None and exc.role != group.role
                if not exc.died or other_role or attempt == self.cfg.run.max_worker_restarts:
                    raise
                log.warning("%s: %s; restarting and redoing it", what, exc)
                self.brought_back(group, what, catch_up)

    def brought_back(self, group: ActorGroup, what: str, catch_up: bool = True) -> None:
        """A worker of `group` was restarted by Ray: learn who is who again; a rollout worker
        rejoins the weight-sync group and, if `catch_up`, gets the current weights."""
        group.refresh_identities(self.cfg.run.step_timeout_s)
        if group is self.groups.rollout:
            if self.cfg.sync.transport == "collective":
                self.groups.join_sync_group()
            if catch_up:
                self.weights.push(self.state.version, f"{what} recovery")
        self.workers_brought_back += 1

    def restart_learners(self, step: int, exc: WorkerError) -> int:
        """A learner rank was lost during `step`. The whole learner group is replaced (a
        DeepSpeed group cannot take in a new rank): new ranks load the newest complete
        checkpoint (the initial weights when there is none), the rollout workers get those
        weights (checked as after any sync), and the run state goes back to that checkpoint
        (`RunState.restore`). Returns the step to go on from; the caller rewinds the metrics."""
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
        # Sampled with weights the run is going back from: cancelled and waited for, or the
        # restarted learners' rejoin and weight push would queue behind its generations on the
        # rollout workers (minutes at the paper's scale) and time out.
        pending = self.state.take_prefetched()
        if pending is not None:
            pending.cancel(self.groups.rollout, run.worker_timeout_s)
        self.checkpoints.drop_upload()  # never committed: its files may be incomplete
        self._replace_learners(from_step, exc)
        if self.cfg.sync.transport == "collective":
            self.groups.join_sync_group()
        self.groups.check_learners_see_storage()
        if ckpt is not None:
            self.checkpoints.load_learners(ckpt)
        self.state.restore(ckpt)
        self.recovering(
            self.groups.rollout,
            lambda: self.weights.push(ckpt.weight_version if ckpt else 0, "learner restart"),
            "learner restart weight sync",
            catch_up=False,
        )
        self.workers_brought_back += 1
        log.warning(
            "learner group restarted in %.1fs; going on from step %d",
            time.monotonic() - started,
            from_step,
        )
        return from_step

    def _replace_learners(self, from_step: int, exc: WorkerError) -> None:
        """Replace the learner group and set it up. A group lost while it starts (its bundles
        were still on a node not yet declared dead: Ray moves them once it is) is another
        learner loss, counted against run.max_failures, and is replaced again."""
        run = self.cfg.run
        while True:
            try:
                self.groups.replace_learners(from_step, attempt=self.learner_failures)
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
