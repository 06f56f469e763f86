"""The three worker groups of a run and their placement: start, respawn, shut down.

    groups = WorkerGroups(cfg, store)   # cfg: the run's, its run.id set
    groups.start(resumed_at)            # one placement group; rollout, teacher, learner spawned;
                                        # DeepSpeed and the weight-sync group set up
    groups.rollout / .teacher / .learner   # .teacher None: teacher.serve scores instead
    groups.replace_learners(from_step, attempt)   # a new learner group, set up
    groups.shutdown()                   # kill the workers, free the placement group

The groups are replaced only here (a new learner group after a learner loss): every part that
uses a group reads it from `WorkerGroups` when it calls, never keeps its own.
"""

from __future__ import annotations

import logging
import time

import ray

from eopd_ray.config import Config
from eopd_ray.driver.actors import (
    ActorGroup,
    create_placement_group,
    spawn,
    wait_started,
    worker_roles,
)
from eopd_ray.env import cpu_has_native_bf16, slow_bf16_warning
from eopd_ray.roles.learner import LearnerWorker
from eopd_ray.roles.rollout import RolloutWorker
from eopd_ray.roles.teacher import TeacherWorker
from eopd_ray.storage.run_storage import RunStorage

log = logging.getLogger(__name__)


class WorkerGroups:
    """The rollout, teacher and learner groups of one run, in one placement group."""

    def __init__(self, cfg: Config, store: RunStorage) -> None:
        self.cfg, self.store = cfg, store
        self.rollout: ActorGroup | None = None
        self.teacher: ActorGroup | None = None
        self.learner: ActorGroup | None = None
        self.placement_group = None
        self.student_dropout = False  # what the learners' set-up found (roles.learner)

    def start(self, resumed_at: int) -> None:
        """Spawn the three roles (`resumed_at` > 0: this attempt resumes the run at that step),
        set up DeepSpeed and the weight-sync group, and check the learners reach the run
        directory."""
        cfg = self.cfg
        cpu_roles = [name for name, c in worker_roles(cfg) if c.gpus_per_worker == 0]
        warning = slow_bf16_warning(cfg.model.dtype, cpu_roles, cpu_has_native_bf16())
        if warning:
            log.warning(warning)
        self.placement_group = create_placement_group(cfg)
        r, s = cfg.rollout.num_workers, self._num_teachers()
        # In-process vLLM engine: weight tensors can be handed straight to reload_weights (the
        # multi-process engine receives them as lists and fails half-way through a reload).
        rollout_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self.rollout = spawn(
            "rollout",
            RolloutWorker,
            cfg,
            self.placement_group,
            0,
            r,
            [(cfg, i) for i in range(r)],
            rollout_env,
            resumed_at,
        )
        if s:  # none with teacher.serve: the application scores
            self.teacher = spawn(
                "teacher",
                TeacherWorker,
                cfg,
                self.placement_group,
                r,
                s,
                [(cfg, i) for i in range(s)],
                None,
                resumed_at,
            )
        self.learner = self._spawn_learners(resumed_at)
        timeout = cfg.run.step_timeout_s
        # The learners' DeepSpeed set-up runs while vLLM and the teacher are still starting.
        setup = self._set_up_learners_async()
        wait_started([g for g in (self.rollout, self.teacher) if g is not None], timeout)
        self.student_dropout = any(self.learner.get(setup, timeout, "learner set-up"))
        if cfg.sync.transport == "collective":
            self.join_sync_group()
        self.check_learners_see_storage()

    def replace_learners(self, from_step: int, attempt: int) -> None:
        """Kill the learner group and start a new one, set up; WorkerError if it is lost while
        it starts."""
        for handle in self.learner.handles:
            ray.kill(handle)
        self.learner = self._spawn_learners(from_step, attempt)
        self.student_dropout = any(
            self.learner.get(
                self._set_up_learners_async(), self.cfg.run.step_timeout_s, "learner restart"
            )
        )

    def _num_teachers(self) -> int:
        """Teacher workers this job starts: none when teacher.serve names an application."""
        return 0 if self.cfg.teacher.serve else self.cfg.teacher.num_workers

    def _spawn_learners(self, from_step: int, attempt: int = 0) -> ActorGroup:
        """The learner group, in its bundles of the placement group (after rollout and teacher)."""
        cfg = self.cfg
        n = cfg.learner.num_workers
        return spawn(
            "learner",
            LearnerWorker,
            cfg,
            self.placement_group,
            cfg.rollout.num_workers + self._num_teachers(),
            n,
            [(cfg, i, n) for i in range(n)],
            {"DS_ACCELERATOR": "cpu"} if cfg.learner.gpus_per_worker == 0 else {},
            from_step,
            attempt,
        )

    def _set_up_learners_async(self) -> list:
        """Wait until the learners are built, then start their DeepSpeed set-up (all ranks at
        once: rank 0 hosts the rendezvous); returns the set-up calls."""
        timeout = self.cfg.run.step_timeout_s
        wait_started([self.learner], timeout)
        addr, port = self.learner.get(
            self.learner.call_async("free_address", ranks=[0]), timeout, "learner address"
        )[0]
        return self.learner.call_async("setup", addr, port)

    def check_learners_see_storage(self) -> None:
        marker, token = ".storage-check", f"{self.cfg.run.id}/{time.time_ns()}"
        self.store.write_text(marker, token)
        self.learner.get(
            self.learner.call_async("check_storage", self.store, marker, token),
            self.cfg.run.step_timeout_s,
            "checking the learners reach run.output_dir",
        )
        self.store.delete(marker)

    def join_sync_group(self) -> None:
        """Form the collective weight-sync group: learner rank 0 and every rollout worker."""
        timeout = self.cfg.sync.timeout_s
        buckets = self.learner.get(
            self.learner.call_async("sync_buckets", ranks=[0]), timeout, "sync plan"
        )[0]
        addr, port = self.learner.get(
            self.learner.call_async("free_address", ranks=[0]), timeout, "sync address"
        )[0]
        world = 1 + len(self.rollout)
        refs = self.learner.call_async("join_sync_group", addr, port, world, ranks=[0])
        refs_r = self.rollout.call_async("join_sync_group", addr, port, world, buckets)
        self.learner.get(refs, timeout, "joining the weight-sync group", ranks=[0])
        self.rollout.get(refs_r, timeout, "joining the weight-sync group")

    def shutdown(self) -> None:
        """Kill every worker and free the placement group."""
        for group in (self.rollout, self.teacher, self.learner):
            for handle in group.handles if group else []:
                ray.kill(handle)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
