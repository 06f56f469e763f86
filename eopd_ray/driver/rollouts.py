"""The step's data from the rollout workers: generated whole, or streamed to the teacher as it
finishes (`rollout.stream`), and the next step's launched early (`rollout.async_lag`).

    rollouts = Rollouts(cfg, groups, weights, recovery, state, prompts, model_shape)
    batch = rollouts.generated(step, pending, timeline)      # RolloutBatch, whole
    data = rollouts.streamed(step, pending, timeline)        # StreamedBatch: batch, scores, pi_old
    rollouts.prefetch_next(step, timeline)                   # step + 1's, into state.prefetched
    rollouts.finish_prefetch(step)                           # waited for before the weight sync

Every rollout batch must carry the weight version the driver expects. After a rollout worker
died the step's batch is generated again from the same prompts and seeds; a prefetch whose
worker died is dropped (its prompts go to the next step), not redone.
"""

from __future__ import annotations

import logging
from typing import Any

from eopd_ray.config import Config
from eopd_ray.config.schema import updates_per_step
from eopd_ray.core.wire import RolloutBatch
from eopd_ray.driver.actors import WorkerError
from eopd_ray.driver.background_stream import StreamInBackground
from eopd_ray.driver.recovery import Recovery
from eopd_ray.driver.run_state import PendingRollout, RunState
from eopd_ray.driver.streamed import ModelShape, StepStream, StreamedBatch
from eopd_ray.driver.weight_versions import WeightVersions
from eopd_ray.driver.worker_groups import WorkerGroups
from eopd_ray.errors import VersionMismatch
from eopd_ray.roles.pi_old import old_from_update
from eopd_ray.roles.rollout_engines import prompt_seeds
from eopd_ray.telemetry.timeline import Timeline

log = logging.getLogger(__name__)


class Rollouts:
    """The step's rollout, whole or streamed, and its prefetch (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        groups: WorkerGroups,
        weights: WeightVersions,
        recovery: Recovery,
        state: RunState,
        prompts: list[list[int]],
        shape: ModelShape,
        served: Any = None,
    ) -> None:
        self.cfg, self.groups, self.weights, self.recovery = cfg, groups, weights, recovery
        self.state, self.prompts, self.shape = state, prompts, shape
        self.served = served  # ServedScoring with teacher.serve: the streamed groups go to it

    # --- whole batches -------------------------------------------------------------------------

    def take_prompts(self, step: int) -> tuple[dict[str, int], list[tuple[list, list, list]]]:
        """(the prompt stream's position before, each rollout worker's (prompts, their indices,
        their seeds)) for the step: worker r takes every W-th prompt from the r-th."""
        cfg, stream = self.cfg, self.state.stream
        stream_state = stream.state_dict()
        indices = stream.take(cfg.rollout.prompts_per_step)
        # Seeds by position in the step: the same streams whatever the number of workers.
        seeds = prompt_seeds(f"{cfg.rollout.seed}/{step}", range(len(indices)))
        workers = len(self.groups.rollout)
        work = [
            (
                [self.prompts[j] for j in indices[rank::workers]],
                indices[rank::workers],
                seeds[rank::workers],
            )
            for rank in range(workers)
        ]
        return stream_state, work

    def launch(self, step: int) -> PendingRollout:
        """Hand the step's prompts to the rollout workers; returns without waiting."""
        stream_state, work = self.take_prompts(step)
        refs = self.groups.rollout.call_each_async("timed", [("generate", *w) for w in work])
        return PendingRollout(step, refs, self.state.version, stream_state)

    def wait(self, pending: PendingRollout) -> None:
        if pending.parts is None:
            timed = self.groups.rollout.get(
                pending.refs, self.cfg.run.step_timeout_s, f"step {pending.step} rollout"
            )
            pending.parts = [part for part, _, _ in timed]
            pending.times = [(start, end) for _, start, end in timed]

    def collect(self, pending: PendingRollout) -> RolloutBatch:
        self.wait(pending)
        versions = [part.weight_version for part in pending.parts]
        if any(v != pending.expected_version for v in versions):
            exc = VersionMismatch(
                f"step {pending.step}: rollout batch parts carry weight versions {versions}, the "
                f"driver expects {pending.expected_version}: a weight sync was lost"
            )
            # A worker that crashed while idle comes back with the initial weights: recovered.
            self.weights.blame_replaced_workers(f"step {pending.step} rollout", exc)
            raise exc
        return RolloutBatch.concat(pending.parts)

    def generated(
        self, step: int, pending: PendingRollout | None, timeline: Timeline
    ) -> RolloutBatch:
        """The step's batch: the prefetched one when there is one, else generated now. After a
        rollout worker died it is generated again from the same prompts and seeds."""
        stream_state = pending.stream_state if pending else self.state.stream.state_dict()

        def rollout() -> RolloutBatch:
            nonlocal pending
            if pending is not None:  # first attempt: the prefetch; a redo generates afresh
                launched, pending = pending, None
            else:
                self.state.stream.load_state_dict(stream_state)  # a redo takes the same prompts
                launched = self.launch(step)
            batch = self.collect(launched)
            for rank, (start, end) in enumerate(launched.times):
                timeline.add(f"rollout-{rank}", "generate", start, end)
            return batch

        return self.recovery.recovering(self.groups.rollout, rollout, f"step {step} rollout")

    # --- streamed ------------------------------------------------------------------------------

    def step_stream(
        self, step: int, timeline: Timeline, prefetch: bool
    ) -> tuple[dict[str, int], StepStream]:
        """(the prompt stream's position before, the step's StepStream, not started)."""
        stream_state, work = self.take_prompts(step)
        pi_old = self.cfg.learner.old_logprobs == "recompute" and not prefetch
        # One update a step: its own forward gives pi_old (roles.pi_old.old_from_update), so
        # the groups go to the learners with train_step, not one by one.
        pi_old = pi_old and not old_from_update(
            self.cfg.learner, updates_per_step(self.cfg), self.groups.student_dropout
        )
        stream = StepStream(
            self.cfg,
            self.groups,
            self.recovery.brought_back,
            self.shape,
            step,
            work,
            self.state.version,
            timeline,
            pi_old,
            prefetch,
            self.served,
        )
        return stream_state, stream

    def streamed(
        self, step: int, pending: PendingRollout | None, timeline: Timeline
    ) -> StreamedBatch:
        """The step's streamed data: the prefetch's when there is one, else streamed now (a
        lost rollout or teacher worker is recovered inside the stream)."""
        if pending is not None and pending.streamed is not None:
            return pending.streamed
        _, stream = self.step_stream(step, timeline, prefetch=False)
        return stream.run()

    # --- the next step's, early ----------------------------------------------------------------

    def prefetch_next(self, step: int, timeline: Timeline) -> None:
        """rollout.async_lag = 1: start step+1's rollout now, on the current weights, so that it
        runs while this step trains. A streamed one runs in a driver thread (its intervals go on
        this step's `timeline`: they happen during it)."""
        if not (self.cfg.rollout.async_lag and step + 1 < self.cfg.run.steps):
            return
        if self.cfg.rollout.stream:  # rolled out and scored in a driver thread while training
            stream_state, stream = self.step_stream(step + 1, timeline, prefetch=True)
            self.state.prefetched = PendingRollout(
                step + 1,
                [],
                self.state.version,
                stream_state,
                background=StreamInBackground(stream),
            )
        else:
            self.state.prefetched = self.launch(step + 1)

    def finish_prefetch(self, step: int) -> None:
        """Wait for the prefetched rollout before the weight sync (a worker takes one call at a
        time). If a rollout worker died, the prefetch is dropped rather than redone: the learner
        has already moved past the weights it was launched on, so a redo would sample with newer
        weights under the old version's label. Ray restarts the worker, the sync that follows
        gives it the new weights, and the next step samples the same prompts on them."""
        pending = self.state.prefetched
        if pending is None:
            return
        try:
            if pending.background is not None:
                pending.streamed = pending.background.result()
            else:
                self.wait(pending)
        except WorkerError as exc:
            if not exc.died or exc.role not in (None, "rollout"):
                raise
            log.warning("step %d rollout (prefetched): %s; dropping it", pending.step, exc)
            self.state.prefetched = None
            self.state.stream.load_state_dict(pending.stream_state)  # the next step takes them
            what = f"step {pending.step} rollout (prefetched)"
            self.recovery.brought_back(self.groups.rollout, what, catch_up=False)
