"""The driver loop, synchronous and strictly on-policy (the reference mode).

    for step in range(run.steps):
        batch  = rollout(prompts)            # student weights v sample responses
        scores = teacher.score(batch)        # H_t, top-K, log pi_te(y_t) per position
        train(batch, scores)                 # updates over mini-batches, EOPD loss
        sync(v + 1)                          # learner rank 0 -> every rollout worker
        evaluate()                           # every eval.every_steps steps and after the last
        write metrics

Per-stage wall times are logged as `time/rollout_s`, `time/teacher_s`, `time/train_s`,
`time/sync_s` (and `time/eval_s`); every rollout batch must carry the weight version the driver
expects.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from eopd_ray.config import Config
from eopd_ray.core.invariants import (
    PROBE_TOKENS,
    check_teacher_scores,
    probe_sequence,
)
from eopd_ray.core.micro_batches import StepShares, share_step
from eopd_ray.core.prompts import PromptStream, tokenize_prompts
from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.driver.actors import (
    ActorGroup,
    WorkerError,
)
from eopd_ray.driver.held_out import HeldOutEvaluation, load_held_out
from eopd_ray.driver.locations import resolve_locations
from eopd_ray.driver.progress import StepProgress
from eopd_ray.driver.recovery import Recovery
from eopd_ray.driver.run_checkpoints import RunCheckpoints
from eopd_ray.driver.worker_groups import StartUp
from eopd_ray.driver.stopping import StopOnSigterm
from eopd_ray.driver.streamed import StreamedBatch, StreamInBackground, Streaming
from eopd_ray.driver.weight_versions import WeightVersions
from eopd_ray.errors import VersionMismatch
from eopd_ray.roles.rollout import prompt_seeds
from eopd_ray.roles.teacher import check_model_pair
from eopd_ray.storage import checkpoint
from eopd_ray.storage.checkpoint import Checkpoint
from eopd_ray.storage.run_claim import RunClaim
from eopd_ray.storage.run_dir import config_to_resume
from eopd_ray.storage.run_storage import RunStorage
from eopd_ray.storage.sources import pin_models, with_local_paths
from eopd_ray.telemetry.ray_gauges import RayMetricsSink
from eopd_ray.telemetry.step_metrics import JsonlSink, TensorBoardSink, reduce_learner_metrics
from eopd_ray.telemetry.timeline import Timeline, role_metrics

log = logging.getLogger(__name__)


@dataclass
class PendingRollout:
    """A rollout in flight: its Ray refs, the weight version it must carry, and the prompt-stream
    position before its prompts were taken (to redo it, or to checkpoint as if not started)."""

    step: int
    refs: list[Any]
    expected_version: int
    stream_state: dict[str, int]
    parts: list[RolloutBatch] | None = field(default=None)
    times: list[tuple[float, float]] = field(default_factory=list)  # per worker: start, end
    # rollout.stream: the streamed rollout and scoring running in a driver thread, and then
    # what it returned
    background: StreamInBackground | None = None
    streamed: StreamedBatch | None = None


def _student_shape(cfg: Config) -> tuple[int, int]:
    """(vocabulary rows the teacher scores over, those both models have; student hidden size)."""
    from transformers import AutoConfig

    remote = cfg.model.trust_remote_code
    student, teacher = (
        AutoConfig.from_pretrained(path, trust_remote_code=remote)
        for path in (cfg.model.student_path, cfg.model.teacher_path)
    )
    return min(student.vocab_size, teacher.vocab_size), student.hidden_size


@contextmanager
def _timed(metrics: dict[str, float], key: str):
    start = time.perf_counter()
    yield
    metrics[key] = time.perf_counter() - start


class Pipeline(StartUp, RunCheckpoints, WeightVersions, Recovery, Streaming, HeldOutEvaluation):
    def __init__(self, cfg: Config) -> None:
        cfg = resolve_locations(cfg)
        self.store = RunStorage(cfg.run.output_dir)
        self.store.check()  # a wrong endpoint or bucket fails now, before Ray starts
        # Hub ids pinned to a commit (a resumed run's own), so every worker loads the same weights.
        cfg = pin_models(cfg, lambda: config_to_resume(cfg, self.store))
        self.cfg = cfg
        # This node's copies of hub or object-store models and data; workers make their own.
        local = with_local_paths(cfg)
        check_model_pair(local)
        self._resume_from: Checkpoint | None = None
        self.claim: RunClaim | None = None
        self._identity: dict | None = None
        # run.allow_config_change: what changed since the resumed checkpoint (shown in metrics)
        self.config_changes: list[str] = []
        self.version = 0
        self.start_step = 0
        self.stopped_early = False
        self.step_in_flight: int | None = None
        self.last_checkpoint: Checkpoint | None = None  # the newest complete one: the resume point
        self._uploading: tuple | None = None  # a checkpoint whose learner files are going up
        self.num_recoveries = 0
        self.learner_failures = 0  # learner groups replaced (run.max_failures)
        self.prompts, self.num_skipped_prompts = tokenize_prompts(local)
        self.held_out = load_held_out(local)  # eval.every_steps: before any worker starts
        self.stream = PromptStream(
            len(self.prompts), seed=cfg.data.seed, shuffle=cfg.data.shuffle, epochs=cfg.data.epochs
        )
        # Where a learner restart with no checkpoint yet goes back to.
        self._initial_stream, self._initial_rng = self.stream.state_dict(), checkpoint.rng_state()
        self._prefetched: PendingRollout | None = None  # rollout.async_lag: the next step's rollout
        self.timeline = Timeline(-1, "start-up")  # the step in flight's (eopd_ray.telemetry)
        # vLLM scores a prompt of at most max_model_len - 1 tokens (one more is generated).
        self.probe_ids = probe_sequence(
            self.prompts, min(PROBE_TOKENS, cfg.rollout.max_model_len - 1)
        )
        self.vocab_rows, hidden = _student_shape(local)  # vocab rows bound the entropy: ln V
        # Attention work per token relative to the linear layers' grows as L / (6 * hidden).
        self.attention_weight = 1.0 / (6 * hidden)
        self.rollout: ActorGroup | None = None
        self.teacher: ActorGroup | None = None
        self.learner: ActorGroup | None = None
        self._pg = None
        self.sync_parts: dict[str, float] = {}  # where the step's weight sync went (sync/*_s)

    @property
    def run_id(self) -> str | None:
        return self.cfg.run.id

    # --- one step ------------------------------------------------------------------------------

    def _take_prompts(self, step: int) -> tuple[dict[str, int], list[tuple[list, list, list]]]:
        """(the prompt stream's position before, each rollout worker's (prompts, their indices,
        their seeds)) for the step: worker r takes every W-th prompt from the r-th."""
        cfg = self.cfg
        stream_state = self.stream.state_dict()
        indices = self.stream.take(cfg.rollout.prompts_per_step)
        # Seeds by position in the step: the same streams whatever the number of workers.
        seeds = prompt_seeds(f"{cfg.rollout.seed}/{step}", range(len(indices)))
        workers = len(self.rollout)
        work = [
            (
                [self.prompts[j] for j in indices[rank::workers]],
                indices[rank::workers],
                seeds[rank::workers],
            )
            for rank in range(workers)
        ]
        return stream_state, work

    def _launch_rollout(self, step: int) -> PendingRollout:
        """Hand the step's prompts to the rollout workers; returns without waiting."""
        stream_state, work = self._take_prompts(step)
        refs = self.rollout.call_each_async("timed", [("generate", *w) for w in work])
        return PendingRollout(step, refs, self.version, stream_state)

    def _wait_rollout(self, pending: PendingRollout) -> None:
        if pending.parts is None:
            timed = self.rollout.get(
                pending.refs, self.cfg.run.step_timeout_s, f"step {pending.step} rollout"
            )
            pending.parts = [part for part, _, _ in timed]
            pending.times = [(start, end) for _, start, end in timed]

    def _collect_rollout(self, pending: PendingRollout) -> RolloutBatch:
        self._wait_rollout(pending)
        versions = [part.weight_version for part in pending.parts]
        if any(v != pending.expected_version for v in versions):
            exc = VersionMismatch(
                f"step {pending.step}: rollout batch parts carry weight versions {versions}, the "
                f"driver expects {pending.expected_version}: a weight sync was lost"
            )
            # A worker that crashed while idle comes back with the initial weights: recovered.
            self._blame_replaced_workers(f"step {pending.step} rollout", exc)
            raise exc
        return RolloutBatch.concat(pending.parts)

    def _score(
        self, batch: RolloutBatch, step: int, timeline: Timeline | None = None
    ) -> TeacherScores:
        shards = batch.split(min(len(self.teacher), batch.num_sequences))
        timed = self.teacher.get(
            self.teacher.call_each_async("timed", [("score", s) for s in shards]),
            self.cfg.run.step_timeout_s,
            f"step {step} teacher scoring",
            ranks=list(range(len(shards))),
        )
        parts = [part for part, _, _ in timed]
        if timeline is not None:
            for rank, (_, start, end) in enumerate(timed):
                timeline.add(f"teacher-{rank}", "score", start, end)
        scores = TeacherScores.concat(parts)
        scores.check_matches(batch)
        for shard, part, ident in zip(shards, parts, self.teacher.identities, strict=False):
            check_teacher_scores(part, shard, self.vocab_rows, step, str(ident))
        return scores

    def _learner_shares(self, batch: RolloutBatch) -> StepShares:
        """Update u uses rows [u*M, (u+1)*M) of the step; core.micro_batches deals them to the
        ranks and cuts micro-batches; each rank gets its rows and its plan in shard rows."""
        lrn = self.cfg.learner
        return share_step(
            batch.sequence_lengths,
            batch.num_sequences // lrn.mini_batch_size,
            len(self.learner),
            micro_batch_size=lrn.micro_batch_size,
            max_tokens_per_micro_batch=lrn.max_tokens_per_micro_batch,
            balance=lrn.balance_tokens,
            attention_weight=self.attention_weight,
        )

    def _recompute_old_logprobs_async(self, batch: RolloutBatch, shares: StepShares) -> list | None:
        if self.cfg.learner.old_logprobs != "recompute":
            return None
        args = [("recompute_old_logprobs", batch.select(rows), plan) for rows, plan in shares.ranks]
        return self.learner.call_each_async("timed", args)

    def _train(
        self,
        batch: RolloutBatch,
        scores: TeacherScores,
        step: int,
        shares: StepShares,
        recompute: list | None = None,
        old: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """`old`: pi_old per row of the step, recomputed per streamed group."""
        lrn = self.cfg.learner
        num_updates = len(shares.plan)
        m = lrn.mini_batch_size
        tokens = [int(batch.response_mask[u * m : (u + 1) * m].sum()) for u in range(num_updates)]
        args = [
            (
                batch.select(rows),
                scores.select(rows),
                tokens,
                plan,
                old[rows] if old is not None else None,
            )
            for rows, plan in shares.ranks
        ]
        try:
            if recompute is not None:
                timed = self.learner.get(
                    recompute, self.cfg.run.step_timeout_s, f"step {step} pi_old"
                )
                for rank, (_, start, end) in enumerate(timed):
                    self.timeline.add(f"learner-{rank}", "pi_old", start, end)
            per_rank_metrics = self.learner.get(
                self.learner.call_each_async("train_step", args),
                self.cfg.run.step_timeout_s,
                f"step {step} training",
            )
        except WorkerError as exc:
            # Learner ranks hold optimizer state: fail fast and say where to resume from.
            ckpt = checkpoint.latest(self.store)
            where = f"resume from {ckpt.uri} (run.resume=auto)" if ckpt else "no checkpoint yet"
            raise WorkerError(f"{exc}; {where}", died=exc.died, role=exc.role) from exc
        metrics = reduce_learner_metrics(per_rank_metrics, num_updates)
        metrics["train/rank_imbalance"] = shares.imbalance
        return metrics

    def step(self, step: int) -> dict[str, float]:
        """One step (see the module docstring), its data handed over whole (`rollout.stream:
        false`) or streamed (eopd_ray.driver.streamed). `time/rollout_s`, `time/teacher_s`,
        `time/train_s`, `time/rollout_wait_s` and `time/sync_s` follow one another: they are
        the step's critical path, and add up to `time/step_s`."""
        metrics: dict[str, float] = {}
        cfg = self.cfg
        mode = ("streamed" if cfg.rollout.stream else "sync") + (
            "+async" if cfg.rollout.async_lag else ""
        )
        timeline = self.timeline = Timeline(step, mode)
        pending, self._prefetched = self._prefetched, None
        old = recompute = None
        if cfg.rollout.stream:
            streamed = self._streamed_with_recovery(step, pending, timeline)
            batch, scores, old = streamed.batch, streamed.scores, streamed.old
            metrics["time/rollout_s"] = max(0.0, streamed.rollout_done - timeline.started)
            metrics["time/teacher_s"] = time.time() - timeline.started - metrics["time/rollout_s"]
            metrics.update(streamed.metrics)
            shares = self._learner_shares(batch)
        else:
            with _timed(metrics, "time/rollout_s"):
                batch = self._rollout_with_recovery(step, pending, timeline)
            shares = self._learner_shares(batch)
            # pi_old does not need the teacher: the learners recompute it while the teacher
            # scores.
            recompute = self._recompute_old_logprobs_async(batch, shares)
            with _timed(metrics, "time/teacher_s"):
                scores = self._recovering(
                    self.teacher,
                    lambda: self._score(batch, step, timeline),
                    f"step {step} teacher scoring",
                )
        self._prefetch_next(step)
        with _timed(metrics, "time/train_s"):
            started = time.time()
            metrics.update(self._train(batch, scores, step, shares, recompute, old))
            timeline.add_role("learner", len(self.learner), "train", started, time.time())
        with _timed(metrics, "time/rollout_wait_s"):  # async: what training did not hide
            self._finish_prefetch(step)
        self.sync_parts = {}
        with _timed(metrics, "time/sync_s"):
            started = time.time()
            self._sync(step)
            timeline.add_role("learner", len(self.learner), "sync", started, time.time())
            timeline.add_role("rollout", len(self.rollout), "sync", started, time.time())
        metrics.update({f"sync/{part}_s": s for part, s in self.sync_parts.items()})
        tokens = batch.num_response_tokens
        lengths = batch.response_mask.sum(1).float()
        step_s = sum(v for k, v in metrics.items() if k.startswith("time/"))
        metrics.update(role_metrics(timeline, step_s))
        teacher_busy = metrics.get("roles/teacher_busy_s") or metrics["time/teacher_s"]
        metrics.update(
            {
                "rollout/response_len_mean": float(lengths.mean()),
                "rollout/prompt_tokens": float(batch.prompt_mask.sum()),
                "rollout/finish_length_frac": batch.finish_reason.count("length")
                / batch.num_sequences,
                # Per teacher worker busy second, times the workers: the role's throughput.
                "teacher/tokens_per_s": tokens / max(1e-9, teacher_busy),
                "teacher/entropy_exact": float(scores.entropy_is_exact),
                "train/tokens_per_s": tokens / metrics["time/train_s"],
                "rollout/weight_version": float(batch.weight_version),
                "rollout/version_lag": float(self.version - 1 - batch.weight_version),
                "time/step_s": step_s,
                "data/skipped_prompts": float(self.num_skipped_prompts),
            }
        )
        if not cfg.rollout.async_lag:  # async: generation overlaps training, unobserved here
            rollout_busy = metrics.get("roles/rollout_busy_s") or metrics["time/rollout_s"]
            metrics["rollout/tokens_per_s"] = tokens / max(1e-9, rollout_busy)
        self._write_timeline(timeline)
        return metrics

    def _write_timeline(self, timeline: Timeline) -> None:
        """The latest step's timeline, for `jobs/plot_metrics.py` (small; best effort)."""
        try:
            self.store.write_text("timeline.json", timeline.to_json())
        except OSError as exc:
            log.warning("could not write timeline.json: %s", exc)

    # --- the run -------------------------------------------------------------------------------

    def _abandoned_message(self) -> str:
        """What the driver says when SIGTERM's grace period ends before the step could finish."""
        last, grace = self.last_checkpoint, self.cfg.run.stop_grace_s
        where = (
            f"resumes at step {last.step + 1} from {last.uri}"
            if last
            else "starts at step 0 (no checkpoint was complete)"
        )
        return (
            f"SIGTERM: step {self.step_in_flight} could not finish and checkpoint within "
            f"run.stop_grace_s = {grace:g}s: abandoned. The next run (the same command, "
            f"run.resume=auto) {where}"
        )

    def run(self, progress: str = "auto") -> list[dict[str, float]]:
        """Steps from `start_step` (0, or after the resumed checkpoint) to `run.steps`, with
        checkpoints every `run.checkpoint_every` steps and after the first step ending
        `run.checkpoint_every_s` after the previous one (`checkpoint_due`), at the end and on
        SIGTERM. `progress`: "bar" (tqdm), "lines" (a log line every `run.log_every_s`), "auto"
        (bar on a TTY)."""
        run = self.cfg.run
        resumed = self.start_step if self.start_step > 0 else None
        sinks = [
            JsonlSink(self.store, resume_from_step=resumed),
            TensorBoardSink(self.store),
            RayMetricsSink(run.name, run.id),
        ]
        history = []
        stop = StopOnSigterm(run.stop_grace_s, self._abandoned_message)
        shown = StepProgress(self.start_step, run.steps, mode=progress, every_s=run.log_every_s)
        checkpointed_at = time.monotonic()  # run.checkpoint_every_s counts from here
        try:
            step = self.start_step
            while step < run.steps:
                self.step_in_flight = step
                try:
                    metrics = self.step(step)
                    if self.evaluation_due(step):
                        metrics.update(self.evaluate(step))
                    if self.config_changes:  # resumed with run.allow_config_change
                        metrics["run/config_changed"] = 1.0
                    self.claim.check(f"step {step}")
                    for sink in sinks:  # before the checkpoint: a resume drops rows past it
                        sink.write(step, metrics)
                    history.append(metrics)
                    shown.update(step, metrics)
                    last = step == run.steps - 1
                    ended_at = time.monotonic()
                    since_s = ended_at - checkpointed_at
                    periodic = self.checkpoint_due(
                        step, since_s, run.checkpoint_every, run.checkpoint_every_s
                    )
                    # A periodic checkpoint on an object store goes up while the next step
                    # runs; the last one, and one on SIGTERM, are complete before going on.
                    complete_now = last or stop.requested or run.checkpoint_upload == "blocking"
                    self.commit_uploaded_checkpoint(wait=complete_now)
                    if last or periodic or stop.requested:
                        self.save_checkpoint(step, wait=complete_now)
                        checkpointed_at = ended_at
                except WorkerError as exc:
                    if not (exc.died and exc.role == "learner"):
                        raise
                    step = self._restart_learners(step, exc)
                    checkpointed_at = time.monotonic()  # back at a checkpoint: nothing at risk
                    sinks[0].rewind(step)  # the steps after the checkpoint are trained again
                    del history[step - self.start_step :]
                    continue
                if stop.requested:
                    log.warning("SIGTERM: checkpoint after step %d written; stopping", step)
                    self.stopped_early = True
                    break
                step += 1
            self.commit_uploaded_checkpoint(wait=True)
            if run.export_hf and history and not self.stopped_early:
                self.export_hf()
        finally:
            shown.close()
            stop.restore()
            for sink in sinks:
                sink.close()
        return history
