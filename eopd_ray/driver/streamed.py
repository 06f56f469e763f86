"""The streamed step (`rollout.stream: true`): no role waits for a whole batch.

    rollout workers   generate_stream: finished responses handed out in groups of at least
                      rollout.stream_group_tokens response tokens while the rest still decode
    teacher workers   each group goes to the teacher with the fewest groups queued, as it arrives
                      (its token-budget micro-batches within the group; the run-time score
                      checks per group); with teacher.serve, to the served application
                      (`ServedScoring.score_async`, eopd_ray.driver.served_teacher)
    learner ranks     pi_old of each group as it arrives (learner.old_logprobs: recompute, and
                      only when the learners hold the weights that sampled it: not for a
                      rollout.async_lag prefetch; not when the step makes one update and takes
                      pi_old from its own forward, roles.pi_old.old_from_update)
    then              the groups are put back in the synchronous batch's row order, and the
                      update starts: what is trained is what `rollout.stream: false` trains

Each row of the step has one fixed place (worker rank, prompt, sample), whichever group brings
it; the assembled batch must hold every row exactly once (`StreamLost` otherwise).

Worker loss mid-stream: groups already handed out are kept (they live in Ray's object store,
not in the worker). A lost rollout worker is restarted, brought to the current weights, and
asked for only the rows it had not handed out yet (the same seeds: the same samples). A lost
teacher's groups in flight go to the teachers again once it is back; a group whose scores
arrived is never scored twice. A stalled worker is found by its heartbeat (run.worker_timeout_s).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from eopd_ray.config import Config
from eopd_ray.core.invariants import check_teacher_scores
from eopd_ray.core.micro_batches import check_every_row_once, plan_step, rank_share
from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.driver.actors import GONE, ActorGroup, WorkerError
from eopd_ray.driver.cancelling import cancel_calls
from eopd_ray.driver.heartbeats import HEARTBEAT_S
from eopd_ray.driver.worker_groups import WorkerGroups
from eopd_ray.errors import EopdError, VersionMismatch
from eopd_ray.telemetry.timeline import Timeline

# Recovery.brought_back(group, what, catch_up): a worker Ray restarted, back in sync.
BringBack = Callable[[ActorGroup, str, bool], None]

log = logging.getLogger(__name__)


class StreamLost(EopdError):
    """A streamed step's groups do not add up to its batch: a row is missing or came twice."""


class StreamCancelled(EopdError):
    """A streamed rollout was stopped by the driver (a prefetch dropped on a learner restart)."""


@dataclass(frozen=True)
class ModelShape:
    """What the driver's checks and plans need to know of the model pair."""

    vocab_rows: int  # vocabulary rows the teacher scores over: the entropy's bound, ln V
    attention_weight: float  # attention work per token relative to the linear layers', per L


@dataclass
class _Group:
    rows: list[int]  # step rows, in the group's order
    batch: RolloutBatch
    scores: TeacherScores | None = None
    old: torch.Tensor | None = None  # pi_old, (rows, T of the group)
    old_rows: list[int] | None = None  # the group's rows whose pi_old came back, over the ranks


@dataclass
class StreamedBatch:
    """A streamed step's data, in the synchronous batch's row order."""

    batch: RolloutBatch
    scores: TeacherScores
    old: torch.Tensor | None  # pi_old per row, or None (the learners recompute it in train_step)
    rollout_done: float  # time.time() the last group arrived
    metrics: dict[str, float]  # stream/*


class StepStream:
    """One step's streamed rollout and scoring (see the module docstring). `work[rank]` is the
    (prompts, prompt_index, seeds) of rollout worker `rank`, as the synchronous step deals them;
    `pi_old`: also recompute pi_old per group; `prefetch`: a rollout.async_lag prefetch (a
    rollout worker lost then fails the stream: the step takes the prompts again, see
    `Rollouts.finish_prefetch`). A lost worker is brought back by `bring_back`. `served`:
    the ServedScoring that scores the groups with teacher.serve (no teacher workers then)."""

    def __init__(
        self,
        cfg: Config,
        workers: WorkerGroups,
        bring_back: BringBack,
        shape: ModelShape,
        step: int,
        work: list[tuple[list, list, list]],
        expected_version: int,
        timeline: Timeline,
        pi_old: bool,
        prefetch: bool = False,
        served: Any = None,
    ) -> None:
        self.cfg, self.workers, self.bring_back, self.shape = cfg, workers, bring_back, shape
        self.served = served
        self.step = step
        self.work, self.expected_version = work, expected_version
        self.timeline, self.pi_old, self.prefetch = timeline, pi_old, prefetch
        n = self.cfg.rollout.samples_per_prompt
        counts = [len(prompts) * n for prompts, _, _ in work]
        self.offsets = [sum(counts[:r]) for r in range(len(work))]
        self.num_rows = sum(counts)
        self.remaining = [set(range(c)) for c in counts]  # per rank: rows not handed out yet
        self.streams: dict[Any, int] = {}  # generator -> rollout rank
        self.scoring: dict[Any, tuple[int, int]] = {}  # ref -> (teacher rank, group)
        self.old_refs: dict[Any, tuple[int, int, list[int]]] = {}  # ref -> (group, rank, rows)
        self.groups: list[_Group] = []
        self.losses = {"rollout": 0, "teacher": 0}
        self.rows_redone = self.groups_rescored = 0  # after worker losses (metrics: stream/*)
        self.rollout_done = time.time()
        self._cancel = threading.Event()

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> StreamedBatch:
        try:
            return self._run()
        except BaseException:
            self._abandon()
            raise

    def cancel(self) -> None:
        """Stop the stream from another thread (a prefetch the run no longer wants): `run`
        raises StreamCancelled within a heartbeat period, its generations cancelled."""
        self._cancel.set()

    def _run(self) -> StreamedBatch:
        for rank in range(len(self.work)):
            self._launch(rank, None)
        deadline = time.monotonic() + self.cfg.run.step_timeout_s
        watched = time.monotonic()
        while self.streams or self.scoring or self.old_refs:
            if self._cancel.is_set():
                raise StreamCancelled(f"step {self.step}: the streamed rollout was cancelled")
            waitables = [*self.streams, *self.scoring, *self.old_refs]
            ready, _ = ray.wait(waitables, num_returns=1, timeout=HEARTBEAT_S)
            if time.monotonic() - watched >= HEARTBEAT_S:  # also while other groups flow
                if time.monotonic() > deadline:
                    self._timed_out()
                self._watch_heartbeats()
                watched = time.monotonic()
            if not ready:
                continue
            item = ready[0]
            if item in self.streams:
                self._next_group(item)
            elif item in self.scoring:
                self._scored(item)
            else:
                self._old_computed(item)
        return self._assembled()

    def _launch(self, rank: int, rows: list[int] | None) -> None:
        prompts, index, seeds = self.work[rank]
        handle = self.workers.rollout.handles[rank]
        gen = handle.generate_stream.options(num_returns="streaming").remote(
            prompts, index, seeds, rows, self.cfg.rollout.stream_group_tokens
        )
        self.workers.rollout.num_calls += 1
        self.streams[gen] = rank

    def _next_group(self, gen) -> None:
        rank = self.streams[gen]
        try:
            ref = next(gen)
        except StopIteration:
            del self.streams[gen]
            if self.remaining[rank]:  # cannot happen unless the worker's engine lost requests
                raise StreamLost(
                    f"step {self.step}: rollout worker {self._who('rollout', rank)} ended its "
                    f"stream without rows {sorted(self.remaining[rank])[:8]}"
                ) from None
            return
        try:
            local_rows, batch, started, at = ray.get(ref)
        except GONE as exc:
            del self.streams[gen]
            self._rollout_lost(rank, exc)
            return
        except ray.exceptions.RayError as exc:
            raise WorkerError(
                f"step {self.step} rollout (streamed): {self._who('rollout', rank)} failed: {exc}",
                role="rollout",
            ) from exc
        if batch.weight_version != self.expected_version:
            exc = VersionMismatch(
                f"step {self.step}: a streamed group from {self._who('rollout', rank)} carries "
                f"weight version {batch.weight_version}, the driver expects "
                f"{self.expected_version}: a weight sync was lost"
            )
            # A worker that crashed while idle comes back with the initial weights: recovered.
            if rank not in self.workers.rollout.replaced(self.cfg.run.step_timeout_s, str(exc)):
                raise exc
            del self.streams[gen]
            self._end_generations({gen: rank})
            self._rollout_lost(rank, exc)
            return
        twice = set(local_rows) - self.remaining[rank]
        if twice:
            raise StreamLost(
                f"step {self.step}: rollout worker {self._who('rollout', rank)} handed out rows "
                f"{sorted(twice)[:8]} twice"
            )
        self.remaining[rank] -= set(local_rows)
        self.timeline.add(f"rollout-{rank}", "generate", started, at)
        self.rollout_done = max(self.rollout_done, time.time())
        group = _Group([self.offsets[rank] + r for r in local_rows], batch)
        self.groups.append(group)
        self._send_to_teacher(len(self.groups) - 1)
        if self.pi_old:
            self._send_to_learners(len(self.groups) - 1)

    def _send_to_teacher(self, gid: int) -> None:
        """To the teacher with the fewest groups queued (ties: the lowest rank)."""
        if self.served is not None:  # one application: its replicas share the groups
            self.scoring[self.served.score_async(self.groups[gid].batch)] = (0, gid)
            return
        queued = [0] * len(self.workers.teacher)
        for rank, _ in self.scoring.values():
            queued[rank] += 1
        rank = min(range(len(queued)), key=queued.__getitem__)
        ref = self.workers.teacher.handles[rank].timed.remote("score", self.groups[gid].batch)
        self.workers.teacher.num_calls += 1
        self.scoring[ref] = (rank, gid)

    def _send_to_learners(self, gid: int) -> None:
        """pi_old of the group, its rows dealt to the ranks as a one-update step (every rank runs
        the same number of forwards: ZeRO-3 gathers parameters in each)."""
        group, lrn = self.groups[gid], self.cfg.learner
        ranks = len(self.workers.learner)
        plan = plan_step(
            group.batch.sequence_lengths,
            1,
            ranks,
            micro_batch_size=lrn.micro_batch_size,
            max_tokens_per_micro_batch=lrn.max_tokens_per_micro_batch,
            balance=lrn.balance_tokens,
            attention_weight=self.shape.attention_weight,
        )
        check_every_row_once(
            plan, group.batch.num_sequences, f"step {self.step}'s pi_old of a streamed group"
        )
        shares = [rank_share(plan, rank) for rank in range(ranks)]
        # A rank with no rows still runs its placeholder forwards, on row 0.
        args = [("old_logprobs", group.batch.select(rows or [0]), p) for rows, p in shares]
        refs = self.workers.learner.call_each_async("timed", args)
        group.old, group.old_rows = torch.zeros_like(group.batch.sampler_logprobs), []
        for rank, (ref, (rows, _)) in enumerate(zip(refs, shares, strict=True)):
            self.old_refs[ref] = (gid, rank, rows)

    def _scored(self, ref) -> None:
        rank, gid = self.scoring.pop(ref)
        try:
            scores, started, ended = (
                self.served.scored(ref, self.step) if self.served else ray.get(ref)
            )
        except GONE as exc:
            self._teacher_lost(rank, [gid], exc)
            return
        except ray.exceptions.RayError as exc:
            raise WorkerError(
                f"step {self.step} teacher scoring (streamed): {self._who('teacher', rank)} "
                f"failed: {exc}",
                role="teacher",
            ) from exc
        group = self.groups[gid]
        scores.check_matches(group.batch)
        check_teacher_scores(
            scores, group.batch, self.shape.vocab_rows, self.step, self._who("teacher", rank)
        )
        group.scores = scores
        self.timeline.add(f"teacher-{rank}", "score", started, ended)

    def _old_computed(self, ref) -> None:
        gid, rank, rows = self.old_refs.pop(ref)
        try:
            old, started, ended = ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise WorkerError(
                f"step {self.step} pi_old (streamed): learner failed: {exc}",
                died=isinstance(exc, GONE),
                role="learner",
            ) from exc
        if rows:  # the rank's rows of the group, in its share's order
            self.groups[gid].old[rows, : old.shape[1]] = old[: len(rows)]
            self.groups[gid].old_rows += rows
        self.timeline.add(f"learner-{rank}", "pi_old", started, ended)

    # --- worker loss ---------------------------------------------------------------------------

    def _lost(self, role: str, rank: int, exc: Exception) -> None:
        self.losses[role] += 1
        if self.losses[role] > self.cfg.run.max_worker_restarts:
            raise WorkerError(
                f"step {self.step} ({role}, streamed): {self._who(role, rank)} lost "
                f"{self.losses[role]} times (run.max_worker_restarts = "
                f"{self.cfg.run.max_worker_restarts}): {exc}",
                died=True,
                role=role,
            ) from exc
        log.warning(
            "step %d (streamed): %s %s lost (%s); restarting it and redoing its work in flight",
            self.step,
            role,
            self._who(role, rank),
            type(exc).__name__,
        )
        group: ActorGroup = getattr(self.workers, role)
        # A rollout worker is also brought to the current weights.
        what = f"step {self.step} streamed {role}"
        self.bring_back(group, what, role == "rollout")

    def _rollout_lost(self, rank: int, exc: Exception) -> None:
        """Restart, bring to the current weights, and ask for the rows not handed out yet."""
        if self.prefetch:  # the learner has moved on: the step takes these prompts again
            raise WorkerError(
                f"step {self.step} rollout (prefetched, streamed): "
                f"{self._who('rollout', rank)} lost: {exc}",
                died=True,
                role="rollout",
            ) from exc
        self._lost("rollout", rank, exc)
        if self.remaining[rank]:
            self.rows_redone += len(self.remaining[rank])
            self._launch(rank, sorted(self.remaining[rank]))

    def _teacher_lost(self, rank: int, lost: list[int], exc: Exception) -> None:
        """`lost` (the failed call's group) and every group still queued on the lost teacher go
        out again once it is back; those calls' failures are no longer waited for."""
        for ref, (r, gid) in list(self.scoring.items()):
            if r == rank:
                del self.scoring[ref]
                lost.append(gid)
        self._lost("teacher", rank, exc)
        self.groups_rescored += len(lost)
        for gid in lost:
            self._send_to_teacher(gid)

    def _abandon(self) -> None:
        """The stream failed or was cancelled: its generations still running are cancelled and
        waited for, so that what the driver does next (a learner restart's rejoin and weight
        push, the next step) does not queue behind a generation nobody will read."""
        streams, self.streams = self.streams, {}
        try:
            self._end_generations(streams)
        except Exception as exc:  # the stream's own error is the one to report
            log.warning("step %d (streamed): ending its generations: %s", self.step, exc)

    def _end_generations(self, streams: dict) -> None:
        """Cancel these generations ({generator: rollout rank}; each stops at its next engine
        step, its requests aborted in the engine) and read them to their end."""
        cancel_calls(
            list(streams),
            [self.workers.rollout.handles[rank] for rank in streams.values()],
            self.cfg.run.worker_timeout_s,
            f"step {self.step} (streamed)",
        )

    def _watch_heartbeats(self) -> None:
        """Kill a worker with work in flight whose heartbeat stopped; its calls then fail and
        the loss is handled as a death."""
        busy = {
            self.workers.rollout: sorted(set(self.streams.values())),
            self.workers.teacher: sorted({r for r, _ in self.scoring.values()}),
            self.workers.learner: list(range(len(self.workers.learner))) if self.old_refs else [],
        }
        for group, ranks in busy.items():
            if group is None:  # teacher.serve: no teacher workers to watch
                continue
            try:
                group.kill_silent(ranks, f"step {self.step} (streamed)")
            except WorkerError as exc:
                log.warning("%s", exc)

    def _timed_out(self) -> None:
        waiting = [self._who("rollout", r) for r in self.streams.values()]
        waiting += [self._who("teacher", r) for r, _ in self.scoring.values()]
        if self.old_refs:
            waiting.append("the learners (pi_old)")
        raise WorkerError(
            f"step {self.step} (streamed): no end within run.step_timeout_s = "
            f"{self.cfg.run.step_timeout_s}s; still waiting for {', '.join(sorted(set(waiting)))}"
        )

    def _who(self, role: str, rank: int) -> str:
        group: ActorGroup = getattr(self.workers, role)
        if group is None:  # teacher.serve
            return self.served.name
        return str(group.identities[rank]) if rank < len(group.identities) else f"{role}-{rank}"

    # --- the batch -----------------------------------------------------------------------------

    def _assembled(self) -> StreamedBatch:
        """The groups in the synchronous batch's row order; every row exactly once."""
        rows = [r for g in self.groups for r in g.rows]
        if sorted(rows) != list(range(self.num_rows)):
            missing = sorted(set(range(self.num_rows)) - set(rows))
            raise StreamLost(
                f"step {self.step}: the streamed groups hold {len(rows)} rows for a step of "
                f"{self.num_rows} (missing {missing[:8]}; duplicated "
                f"{len(rows) - len(set(rows))}): a group was lost or handed out twice"
            )
        order = torch.empty(self.num_rows, dtype=torch.int64)
        order[torch.tensor(rows)] = torch.arange(self.num_rows)
        batch = RolloutBatch.concat([g.batch for g in self.groups]).select(order)
        scores = TeacherScores.concat([g.scores for g in self.groups]).select(order)
        old = None
        if self.pi_old:
            self._check_pi_old_coverage()
            old = torch.zeros_like(batch.sampler_logprobs)
            for g in self.groups:
                old[g.rows, : g.old.shape[1]] = g.old
        metrics = {
            "stream/groups": float(len(self.groups)),
            "stream/rows_redone": float(self.rows_redone),
            "stream/groups_rescored": float(self.groups_rescored),
        }
        return StreamedBatch(batch, scores, old, self.rollout_done, metrics)

    def _check_pi_old_coverage(self) -> None:
        """Every row of every group got its pi_old from exactly one learner rank (a row left
        out would train on log pi_old = 0, a silent error no later check is sure to catch)."""
        for gid, g in enumerate(self.groups):
            got = sorted(g.old_rows or [])
            if got != list(range(len(g.rows))):
                missing = sorted(set(range(len(g.rows))) - set(got))
                raise StreamLost(
                    f"step {self.step}: streamed group {gid} ({len(g.rows)} rows) got pi_old for "
                    f"{len(got)} rows from the learner ranks (missing {missing[:8]}, duplicated "
                    f"{len(got) - len(set(got))}): a learner share was lost or dealt twice"
                )
