"""Bringing a run up and down: Ray, the run directory and its claim, the workers, the groups.

    start()     connect, claim run.output_dir, begin (or resume) the run, spawn the three roles
                in one placement group, set up DeepSpeed and the weight-sync group, resume
    shutdown()  release the claim, kill the workers, free the placement group

Part of `Pipeline` (its base class): it sets the worker groups the step loop uses.
"""

from __future__ import annotations

import logging
import time

from eopd_ray.driver.actors import connect, create_placement_group, spawn, wait_started
from eopd_ray.driver.stopping import exit_on_sigterm, on_abrupt_exit
from eopd_ray.roles.learner import LearnerWorker
from eopd_ray.roles.rollout import RolloutWorker
from eopd_ray.roles.teacher import TeacherWorker
from eopd_ray.storage.checkpoint import stored_config_yaml
from eopd_ray.storage.run_claim import RunClaim
from eopd_ray.storage.run_dir import begin_run

log = logging.getLogger(__name__)


class StartUp:
    """Start-up and shutdown of `Pipeline` (see the module docstring)."""

    def start(self) -> None:
        # The run directory before any worker: it decides the run id (actor names, metric tags)
        # and whether this resumes; an earlier run's files move to previous/ first.
        exit_on_sigterm()
        connect(self.cfg)
        exit_on_sigterm()  # again: ray.init installs its own handler
        # One driver per run directory, before anything in it is read, moved or deleted.
        self.claim = RunClaim.acquire(self.store, self.cfg.run.claim_heartbeat_s)
        # An abandoned step or a stop during start-up exits without shutdown(): owner.json too.
        self._forget_claim = on_abrupt_exit(self.claim.release)
        self.cfg, self._resume_from = begin_run(self.cfg, self.store)
        self.claim.set_run_id(self.cfg.run.id)
        self.claim.start()
        self.store.write_text("config.yaml", stored_config_yaml(self.cfg))  # credentials masked
        log.info("run %s: outputs in %s", self.cfg.run.id, self.store.uri)
        cfg = self.cfg
        self._pg = create_placement_group(cfg)
        r, s = cfg.rollout.num_workers, cfg.teacher.num_workers
        # In-process vLLM engine: weight tensors can be handed straight to reload_weights (the
        # multi-process engine receives them as lists and fails half-way through a reload).
        rollout_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        resumed_at = self._resume_from.step + 1 if self._resume_from else 0
        self.rollout = spawn(
            "rollout",
            RolloutWorker,
            cfg,
            self._pg,
            0,
            r,
            [(cfg, i) for i in range(r)],
            rollout_env,
            resumed_at,
        )
        self.teacher = spawn(
            "teacher",
            TeacherWorker,
            cfg,
            self._pg,
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
        wait_started([self.rollout, self.teacher], timeout)
        self.learner.get(setup, timeout, "learner set-up")
        if cfg.sync.transport == "collective":
            self._join_sync_group()
        self._check_learners_see_storage()
        if self._resume_from is not None:
            self._resume(self._resume_from)

    def _spawn_learners(self, from_step: int, attempt: int = 0):
        """The learner group, in its bundles of the placement group (after rollout and teacher)."""
        cfg = self.cfg
        n = cfg.learner.num_workers
        return spawn(
            "learner",
            LearnerWorker,
            cfg,
            self._pg,
            cfg.rollout.num_workers + cfg.teacher.num_workers,
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

    def _check_learners_see_storage(self) -> None:
        marker, token = ".storage-check", f"{self.cfg.run.id}/{time.time_ns()}"
        self.store.write_text(marker, token)
        self.learner.get(
            self.learner.call_async("check_storage", self.store, marker, token),
            self.cfg.run.step_timeout_s,
            "checking the learners reach run.output_dir",
        )
        self.store.delete(marker)

    def _join_sync_group(self) -> None:
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
        import ray

        if self.claim is not None:
            self.claim.release()
            self._forget_claim()

        for group in (self.rollout, self.teacher, self.learner):
            for handle in group.handles if group else []:
                ray.kill(handle)
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
