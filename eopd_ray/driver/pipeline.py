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
from eopd_ray.driver.actors import WorkerError, connect
from eopd_ray.driver.held_out import HeldOutEvaluation, load_held_out
from eopd_ray.driver.locations import resolve_locations
from eopd_ray.driver.progress import StepProgress
from eopd_ray.driver.recovery import Recovery
from eopd_ray.driver.rollouts import Rollouts
from eopd_ray.driver.run_checkpoints import RunCheckpoints, checkpoint_due
from eopd_ray.driver.run_state import RunState
from eopd_ray.driver.served_teacher import ServedScoring, load_student_tokenizer
from eopd_ray.driver.stopping import StopOnSigterm, exit_on_sigterm, on_abrupt_exit
from eopd_ray.driver.streamed import ModelShape
from eopd_ray.driver.weight_versions import WeightVersions
from eopd_ray.driver.worker_groups import WorkerGroups
from eopd_ray.roles.teacher import check_model_pair
from eopd_ray.storage import checkpoint
from eopd_ray.storage.checkpoint import stored_config_yaml
from eopd_ray.storage.run_claim import RunClaim
from eopd_ray.storage.run_dir import begin_run, config_to_resume
from eopd_ray.storage.run_storage import RunStorage
from eopd_ray.storage.sources import pin_models, with_local_paths
from eopd_ray.telemetry.ray_gauges import RayMetricsSink
from eopd_ray.telemetry.step_metrics import (
    JsonlSink,
    TensorBoardSink,
    data_metrics,
    reduce_learner_metrics,
)
from eopd_ray.telemetry.timeline import Timeline, role_metrics

log = logging.getLogger(__name__)


def _model_shape(cfg: Config) -> ModelShape:
    """The vocabulary rows the teacher scores over (those both models have) and the attention
    weight of the student's plans."""
    from transformers import AutoConfig

    remote = cfg.model.trust_remote_code
    student, teacher = (
        AutoConfig.from_pretrained(path, trust_remote_code=remote)
        for path in (cfg.model.student_path, cfg.model.teacher_path)
    )
    # Attention work per token relative to the linear layers' grows as L / (6 * hidden).
    return ModelShape(min(student.vocab_size, teacher.vocab_size), 1.0 / (6 * student.hidden_size))


@contextmanager
def _timed(metrics: dict[str, float], key: str):
    start = time.perf_counter()
    yield
    metrics[key] = time.perf_counter() - start


class Pipeline:
    """One run: its config, prompts and state (`RunState`), and the parts that do the work,
    made in `start()` once the run directory is claimed and the run's id known:

    groups       WorkerGroups      the three worker groups and their placement
    weights      WeightVersions    push the learner's weights, confirm and probe them
    checkpoints  RunCheckpoints    save, upload, commit, resume, export
    recovery     Recovery          which worker was lost and which part brings what back
    rollouts     Rollouts          the step's data, whole or streamed, and its prefetch
    evaluation   HeldOutEvaluation the held-out set during training
    served       ServedScoring     teacher.serve: a running application scores (no teacher workers)
    """

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
        self.claim: RunClaim | None = None
        self._forget_claim = lambda: None  # start(): stop releasing the claim on an abrupt exit
        # run.allow_config_change: what changed since the resumed checkpoint (shown in metrics)
        self.config_changes: list[str] = []
        self.start_step = 0
        self.stopped_early = False
        self.step_in_flight: int | None = None
        self.prompts, self.num_skipped_prompts = tokenize_prompts(local)
        self.held_out = load_held_out(local)  # eval.every_steps: before any worker starts
        stream = PromptStream(
            len(self.prompts), seed=cfg.data.seed, shuffle=cfg.data.shuffle, epochs=cfg.data.epochs
        )
        self.state = RunState.begin(stream)
        self.timeline = Timeline(-1, "start-up")  # the step in flight's (eopd_ray.telemetry)
        # vLLM scores a prompt of at most max_model_len - 1 tokens (one more is generated).
        self.probe_ids = probe_sequence(
            self.prompts, min(PROBE_TOKENS, cfg.rollout.max_model_len - 1)
        )
        self.shape = _model_shape(local)
        self.student_tokenizer = load_student_tokenizer(local) if cfg.teacher.serve else None
        self.served: ServedScoring | None = None  # teacher.serve: scores instead of workers
        self.groups: WorkerGroups | None = None
        self.weights: WeightVersions | None = None
        self.checkpoints: RunCheckpoints | None = None
        self.recovery: Recovery | None = None
        self.rollouts: Rollouts | None = None
        self.evaluation: HeldOutEvaluation | None = None

    @property
    def run_id(self) -> str | None:
        return self.cfg.run.id

    # Read-only views of the run so far, for the job's messages and the tests.
    version = property(lambda self: self.state.version)
    last_checkpoint = property(lambda self: self.state.last_checkpoint)
    num_recoveries = property(lambda self: self.recovery.num_recoveries if self.recovery else 0)
    learner_failures = property(lambda self: self.recovery.learner_failures if self.recovery else 0)
    rollout = property(lambda self: self.groups.rollout if self.groups else None)
    teacher = property(lambda self: self.groups.teacher if self.groups else None)
    learner = property(lambda self: self.groups.learner if self.groups else None)

    # --- start and shutdown --------------------------------------------------------------------

    def start(self) -> None:
        """Connect, claim run.output_dir, begin (or resume) the run, make the parts, spawn the
        three roles in one placement group, set up DeepSpeed and the weight-sync group,
        resume."""
        # The run directory before any worker: it decides the run id (actor names, metric tags)
        # and whether this resumes; an earlier run's files move to previous/ first.
        exit_on_sigterm()
        connect(self.cfg)
        exit_on_sigterm()  # again: ray.init installs its own handler
        if self.cfg.teacher.serve:  # refused before the run directory is touched
            self.served = ServedScoring.connect(self.cfg, self.shape, self.student_tokenizer)
        # One driver per run directory, before anything in it is read, moved or deleted.
        self.claim = RunClaim.acquire(self.store, self.cfg.run.claim_heartbeat_s)
        # An abandoned step or a stop during start-up exits without shutdown(): owner.json too.
        self._forget_claim = on_abrupt_exit(self.claim.release)
        self.cfg, resume_from = begin_run(self.cfg, self.store)
        self.claim.set_run_id(self.cfg.run.id)
        self.claim.start()
        self.store.write_text("config.yaml", stored_config_yaml(self.cfg))  # credentials masked
        log.info("run %s: outputs in %s", self.cfg.run.id, self.store.uri)
        self._make_parts()
        self.groups.start(resume_from.step + 1 if resume_from else 0)
        if resume_from is not None:
            self.config_changes = self.checkpoints.resume(resume_from)
            self.start_step = self.state.next_step

    def _make_parts(self) -> None:
        """Each part gets the run's config (its id set) and the parts it calls."""
        cfg, store, state = self.cfg, self.store, self.state
        self.groups = groups = WorkerGroups(cfg, store)
        self.weights = weights = WeightVersions(cfg, groups, state, self.probe_ids)
        self.checkpoints = RunCheckpoints(
            cfg, store, self.claim, groups, weights, state, self.prompts
        )
        self.recovery = Recovery(cfg, store, groups, weights, self.checkpoints, state)
        self.rollouts = Rollouts(
            cfg, groups, weights, self.recovery, state, self.prompts, self.shape, self.served
        )
        self.evaluation = HeldOutEvaluation(cfg, groups, state, self.recovery, self.held_out)

    def shutdown(self) -> None:
        """Release the claim, kill the workers, free the placement group."""
        if self.claim is not None:
            self.claim.release()
            self._forget_claim()
        if self.groups is not None:
            self.groups.shutdown()

    # --- one step ------------------------------------------------------------------------------

    def _score(
        self, batch: RolloutBatch, step: int, timeline: Timeline | None = None
    ) -> TeacherScores:
        if self.served is not None:
            return self.served.score(batch, step, timeline)
        teacher = self.groups.teacher
        shards = batch.split(min(len(teacher), batch.num_sequences))
        timed = teacher.get(
            teacher.call_each_async("timed", [("score", s) for s in shards]),
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
        for shard, part, ident in zip(shards, parts, teacher.identities, strict=False):
            check_teacher_scores(part, shard, self.shape.vocab_rows, step, str(ident))
        return scores

    def _learner_shares(self, batch: RolloutBatch) -> StepShares:
        """Update u uses rows [u*M, (u+1)*M) of the step; core.micro_batches deals them to the
        ranks and cuts micro-batches; each rank gets its rows and its plan in shard rows."""
        lrn = self.cfg.learner
        return share_step(
            batch.sequence_lengths,
            batch.num_sequences // lrn.mini_batch_size,
            len(self.groups.learner),
            micro_batch_size=lrn.micro_batch_size,
            max_tokens_per_micro_batch=lrn.max_tokens_per_micro_batch,
            balance=lrn.balance_tokens,
            attention_weight=self.shape.attention_weight,
        )

    def _recompute_old_logprobs_async(self, batch: RolloutBatch, shares: StepShares) -> list | None:
        if self.cfg.learner.old_logprobs != "recompute":
            return None
        args = [("recompute_old_logprobs", batch.select(rows), plan) for rows, plan in shares.ranks]
        return self.groups.learner.call_each_async("timed", args)

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
        lrn, learner = self.cfg.learner, self.groups.learner
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
                timed = learner.get(recompute, self.cfg.run.step_timeout_s, f"step {step} pi_old")
                for rank, (_, start, end) in enumerate(timed):
                    self.timeline.add(f"learner-{rank}", "pi_old", start, end)
            per_rank_metrics = learner.get(
                learner.call_each_async("train_step", args),
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
        pending = self.state.take_prefetched()
        old = recompute = None
        if cfg.rollout.stream:  # rollout and scoring, group by group
            streamed = self.rollouts.streamed(step, pending, timeline)
            batch, scores, old = streamed.batch, streamed.scores, streamed.old
            metrics["time/rollout_s"] = max(0.0, streamed.rollout_done - timeline.started)
            metrics["time/teacher_s"] = time.time() - timeline.started - metrics["time/rollout_s"]
            metrics.update(streamed.metrics)
            shares = self._learner_shares(batch)
        else:
            with _timed(metrics, "time/rollout_s"):
                batch = self.rollouts.generated(step, pending, timeline)
            shares = self._learner_shares(batch)
            # pi_old does not need the teacher: the learners recompute it while the teacher
            # scores.
            recompute = self._recompute_old_logprobs_async(batch, shares)
            with _timed(metrics, "time/teacher_s"):
                scores = self.recovery.recovering(
                    self.groups.teacher,
                    lambda: self._score(batch, step, timeline),
                    f"step {step} teacher scoring",
                )
        self.rollouts.prefetch_next(step, timeline)
        learners, rollouts = len(self.groups.learner), len(self.groups.rollout)
        with _timed(metrics, "time/train_s"):
            started = time.time()
            metrics.update(self._train(batch, scores, step, shares, recompute, old))
            timeline.add_role("learner", learners, "train", started, time.time())
        with _timed(metrics, "time/rollout_wait_s"):  # async: what training did not hide
            self.rollouts.finish_prefetch(step)
        self.weights.sync_parts.clear()  # the step's sync/*_s: this sync's parts only
        with _timed(metrics, "time/sync_s"):
            started = time.time()
            self._sync(step)
            timeline.add_role("learner", learners, "sync", started, time.time())
            timeline.add_role("rollout", rollouts, "sync", started, time.time())
        metrics.update({f"sync/{part}_s": s for part, s in self.weights.sync_parts.items()})
        step_s = sum(v for k, v in metrics.items() if k.startswith("time/"))
        metrics.update(role_metrics(timeline, step_s))
        metrics["time/step_s"] = step_s
        metrics["data/skipped_prompts"] = float(self.num_skipped_prompts)
        # The sync made version state.version; the batch was sampled by batch.weight_version.
        lag = self.state.version - 1 - batch.weight_version
        metrics.update(data_metrics(batch, scores, metrics, lag, bool(cfg.rollout.async_lag)))
        self._write_timeline(timeline)
        return metrics

    def _sync(self, step: int) -> None:
        """Send the new weights to every rollout worker; all must report version v + 1.
        Rollout workers lost while the teacher or the learners worked (their node went down)
        are first seen here: once Ray has restarted them, the sync is redone, to the same
        version (the probe may have failed after the workers took v + 1)."""
        new_version = self.state.version + 1
        self.recovery.recovering(
            self.groups.rollout,
            lambda: self.weights.push(new_version, f"step {step}"),
            f"step {step} weight sync",
            catch_up=False,  # the redone sync is the catch-up
        )

    def _write_timeline(self, timeline: Timeline) -> None:
        """The latest step's timeline, for `jobs/plot_metrics.py` (small; best effort)."""
        try:
            self.store.write_text("timeline.json", timeline.to_json())
        except OSError as exc:
            log.warning("could not write timeline.json: %s", exc)

    # --- the run -------------------------------------------------------------------------------

    def _abandoned_message(self) -> str:
        """What the driver says when SIGTERM's grace period ends before the step could finish."""
        last, grace = self.state.last_checkpoint, self.cfg.run.stop_grace_s
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
                    if self.evaluation.due(step):
                        metrics.update(self.evaluation.evaluate(step))
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
                    periodic = checkpoint_due(
                        step, since_s, run.checkpoint_every, run.checkpoint_every_s
                    )
                    # A periodic checkpoint on an object store goes up while the next step
                    # runs; the last one, and one on SIGTERM, are complete before going on.
                    complete_now = last or stop.requested or run.checkpoint_upload == "blocking"
                    self.checkpoints.commit_uploaded(wait=complete_now)
                    if last or periodic or stop.requested:
                        self.checkpoints.save(step, wait=complete_now)
                        checkpointed_at = ended_at
                except WorkerError as exc:
                    if not (exc.died and exc.role == "learner"):
                        raise
                    step = self.recovery.restart_learners(step, exc)
                    checkpointed_at = time.monotonic()  # back at a checkpoint: nothing at risk
                    sinks[0].rewind(step)  # the steps after the checkpoint are trained again
                    del history[step - self.start_step :]
                    continue
                if stop.requested:
                    log.warning("SIGTERM: checkpoint after step %d written; stopping", step)
                    self.stopped_early = True
                    break
                step += 1
            self.checkpoints.commit_uploaded(wait=True)
            if run.export_hf and history and not self.stopped_early:
                self.checkpoints.export_hf()
        finally:
            shown.close()
            stop.restore()
            for sink in sinks:
                sink.close()
        return history
