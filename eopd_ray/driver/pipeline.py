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

from eopd_ray.config import Config, config_to_yaml
from eopd_ray.core.invariants import (
    PROBE_TOKENS,
    check_teacher_scores,
    check_weights_in_sync,
    check_weights_loaded,
    logprob_gap_bound,
    probe_sequence,
)
from eopd_ray.core.micro_batches import StepShares, share_step
from eopd_ray.core.prompts import PromptStream, tokenize_prompts
from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.driver.actors import (
    ActorGroup,
    WorkerError,
    connect,
    create_placement_group,
    spawn,
    wait_started,
)
from eopd_ray.driver.held_out import load_held_out, summary_line
from eopd_ray.driver.locations import resolve_locations
from eopd_ray.driver.progress import StepProgress
from eopd_ray.driver.stopping import StopOnSigterm, exit_on_sigterm
from eopd_ray.errors import EopdError
from eopd_ray.roles.learner import LearnerWorker
from eopd_ray.roles.rollout import RolloutWorker, prompt_seeds
from eopd_ray.roles.teacher import TeacherWorker, check_model_pair
from eopd_ray.storage import checkpoint
from eopd_ray.storage.checkpoint import Checkpoint
from eopd_ray.storage.run_claim import RunClaim
from eopd_ray.storage.run_dir import begin_run
from eopd_ray.storage.run_storage import RunStorage
from eopd_ray.telemetry.ray_gauges import RayMetricsSink
from eopd_ray.telemetry.step_metrics import JsonlSink, TensorBoardSink, reduce_learner_metrics

log = logging.getLogger(__name__)


class VersionMismatch(EopdError):
    """A rollout batch was sampled with other weights than the driver expects."""


@dataclass
class _Rollout:
    """A rollout in flight: its Ray refs, the weight version it must carry, and the prompt-stream
    position before its prompts were taken (to redo it, or to checkpoint as if not started)."""

    step: int
    refs: list[Any]
    expected_version: int
    stream_state: dict[str, int]
    parts: list[RolloutBatch] | None = field(default=None)


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


class Pipeline:
    def __init__(self, cfg: Config) -> None:
        cfg = resolve_locations(cfg)
        self.cfg = cfg
        check_model_pair(cfg)
        self.store = RunStorage(cfg.run.output_dir)
        self._resume_from: Checkpoint | None = None
        self.claim: RunClaim | None = None
        self._identity: dict | None = None
        # run.allow_config_change: what changed since the resumed checkpoint (shown in metrics)
        self.config_changes: list[str] = []
        self.version = 0
        self.start_step = 0
        self.stopped_early = False
        self.num_recoveries = 0
        self.prompts, self.num_skipped_prompts = tokenize_prompts(cfg)
        self.held_out = load_held_out(cfg)  # eval.every_steps: before any worker starts
        self.stream = PromptStream(
            len(self.prompts), seed=cfg.data.seed, shuffle=cfg.data.shuffle, epochs=cfg.data.epochs
        )
        self._prefetched: _Rollout | None = None  # rollout.async_lag: the next step's rollout
        # vLLM scores a prompt of at most max_model_len - 1 tokens (one more is generated).
        self.probe_ids = probe_sequence(
            self.prompts, min(PROBE_TOKENS, cfg.rollout.max_model_len - 1)
        )
        self.vocab_rows, hidden = _student_shape(cfg)  # vocab rows bound the entropy: ln V
        # Attention work per token relative to the linear layers' grows as L / (6 * hidden).
        self.attention_weight = 1.0 / (6 * hidden)
        self.rollout: ActorGroup | None = None
        self.teacher: ActorGroup | None = None
        self.learner: ActorGroup | None = None
        self._pg = None

    # --- set-up --------------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self.cfg.run.id

    def start(self) -> None:
        # The run directory before any worker: it decides the run id (actor names, metric tags)
        # and whether this resumes; an earlier run's files move to previous/ first.
        exit_on_sigterm()
        connect(self.cfg)
        exit_on_sigterm()  # again: ray.init installs its own handler
        # One driver per run directory, before anything in it is read, moved or deleted.
        self.claim = RunClaim.acquire(self.store, self.cfg.run.claim_heartbeat_s)
        self.cfg, self._resume_from = begin_run(self.cfg, self.store)
        self.claim.set_run_id(self.cfg.run.id)
        self.claim.start()
        self.store.write_text("config.yaml", config_to_yaml(self.cfg))
        log.info("run %s: outputs in %s", self.cfg.run.id, self.store.uri)
        cfg = self.cfg
        self._pg = create_placement_group(cfg)
        r, s, n = cfg.rollout.num_workers, cfg.teacher.num_workers, cfg.learner.num_workers
        # In-process vLLM engine: weight tensors can be handed straight to reload_weights (the
        # multi-process engine receives them as lists and fails half-way through a reload).
        rollout_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        learner_env = {"DS_ACCELERATOR": "cpu"} if cfg.learner.gpus_per_worker == 0 else {}
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
        self.learner = spawn(
            "learner",
            LearnerWorker,
            cfg,
            self._pg,
            r + s,
            n,
            [(cfg, i, n) for i in range(n)],
            learner_env,
            resumed_at,
        )
        timeout = cfg.run.step_timeout_s
        # The learners' DeepSpeed set-up runs while vLLM and the teacher are still starting.
        wait_started([self.learner], timeout)
        addr, port = self.learner.get(
            self.learner.call_async("free_address", ranks=[0]), timeout, "learner address"
        )[0]
        setup = self.learner.call_async("setup", addr, port)
        wait_started([self.rollout, self.teacher], timeout)
        self.learner.get(setup, timeout, "learner set-up")
        if cfg.sync.transport == "collective":
            self._join_sync_group()
        self._check_learners_see_storage()
        if self._resume_from is not None:
            self._resume(self._resume_from)

    def _check_learners_see_storage(self) -> None:
        marker, token = ".storage-check", f"{self.cfg.run.id}/{time.time_ns()}"
        self.store.write_text(marker, token)
        self.learner.get(
            self.learner.call_async("check_storage", self.store, marker, token),
            self.cfg.run.step_timeout_s,
            "checking the learners reach run.output_dir",
        )
        self.store.delete(marker)

    def _resume(self, ckpt: Checkpoint) -> None:
        """Continue from checkpoint `ckpt`: learner state on every rank, weights pushed to the
        rollout workers, data position, RNG, step and version."""
        self.config_changes = checkpoint.check_compatible(
            self.cfg, ckpt, self.store, self.training_identity
        )
        for change in self.config_changes:
            log.warning("resuming with run.allow_config_change: %s", change)
        timeout = self.cfg.run.step_timeout_s
        self.learner.get(
            self.learner.call_async("load_checkpoint", self.store, ckpt.rel),
            timeout,
            f"loading {ckpt.uri}",
        )
        self._push_weights(ckpt.weight_version, "resume")
        self.stream.load_state_dict(ckpt.stream)
        checkpoint.restore_rng(ckpt)
        self.start_step = ckpt.step + 1
        log.info(
            "resumed from %s: next step %d, weight version %d",
            ckpt.uri,
            self.start_step,
            self.version,
        )

    def save_checkpoint(self, step: int) -> Checkpoint:
        """An atomic checkpoint after `step` (every learner rank writes its DeepSpeed state)."""
        self.claim.check(f"checkpoint after step {step}")
        rel = checkpoint.begin(self.store, step)
        written = self.learner.get(
            self.learner.call_async("save_checkpoint", self.store, rel),
            self.cfg.run.step_timeout_s,
            f"checkpoint after step {step}",
        )
        # A prefetched rollout is not part of the state: a resumed run takes its prompts again.
        stream = self._prefetched.stream_state if self._prefetched else self.stream.state_dict()
        self.claim.check(f"checkpoint after step {step}")
        return checkpoint.commit(
            self.store,
            rel,
            self.cfg,
            step,
            self.version,
            stream,
            learner_files=sorted({f for files in written for f in files}),
            trained_on=self.training_identity,
        )

    @property
    def training_identity(self) -> dict:
        """The kept prompts and the LR schedule, recorded in every checkpoint."""
        if self._identity is None:
            self._identity = checkpoint.training_identity(self.cfg, self.prompts)
        return self._identity

    def export_hf(self) -> str:
        """The current student as a Hugging Face model in <run.output_dir>/hf; returns where."""
        self.learner.get(
            self.learner.call_async("export_hf", self.store, "hf"),
            self.cfg.run.step_timeout_s,
            "HF export",
        )
        return self.store.show("hf")

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

    # --- one step ------------------------------------------------------------------------------

    def _launch_rollout(self, step: int) -> _Rollout:
        """Hand the step's prompts to the rollout workers; returns without waiting."""
        cfg = self.cfg
        stream_state = self.stream.state_dict()
        indices = self.stream.take(cfg.rollout.prompts_per_step)
        # Seeds by position in the step: the same streams whatever the number of workers.
        seeds = prompt_seeds(f"{cfg.rollout.seed}/{step}", range(len(indices)))
        workers = len(self.rollout)
        args = [
            (
                [self.prompts[j] for j in indices[rank::workers]],
                indices[rank::workers],
                seeds[rank::workers],
            )
            for rank in range(workers)
        ]
        refs = self.rollout.call_each_async("generate", args)
        return _Rollout(step, refs, self.version, stream_state)

    def _wait_rollout(self, pending: _Rollout) -> None:
        if pending.parts is None:
            pending.parts = self.rollout.get(
                pending.refs, self.cfg.run.step_timeout_s, f"step {pending.step} rollout"
            )

    def _collect_rollout(self, pending: _Rollout) -> RolloutBatch:
        self._wait_rollout(pending)
        batch = RolloutBatch.concat(pending.parts)
        if batch.weight_version != pending.expected_version:
            raise VersionMismatch(
                f"step {pending.step}: rollout batch carries weight version "
                f"{batch.weight_version}, the driver expects {pending.expected_version}: a weight "
                "sync was lost"
            )
        return batch

    def _rollout_with_recovery(self, step: int, pending: _Rollout | None) -> RolloutBatch:
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

    def _score(self, batch: RolloutBatch, step: int) -> TeacherScores:
        shards = batch.split(min(len(self.teacher), batch.num_sequences))
        parts = self.teacher.get(
            self.teacher.call_each_async("score", [(s,) for s in shards]),
            self.cfg.run.step_timeout_s,
            f"step {step} teacher scoring",
            ranks=list(range(len(shards))),
        )
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
        args = [(batch.select(rows), plan) for rows, plan in shares.ranks]
        return self.learner.call_each_async("recompute_old_logprobs", args)

    def _train(
        self,
        batch: RolloutBatch,
        scores: TeacherScores,
        step: int,
        shares: StepShares,
        recompute: list | None = None,
    ) -> dict[str, float]:
        lrn = self.cfg.learner
        num_updates = len(shares.plan)
        m = lrn.mini_batch_size
        tokens = [int(batch.response_mask[u * m : (u + 1) * m].sum()) for u in range(num_updates)]
        args = [
            (batch.select(rows), scores.select(rows), tokens, plan) for rows, plan in shares.ranks
        ]
        try:
            if recompute is not None:
                self.learner.get(recompute, self.cfg.run.step_timeout_s, f"step {step} pi_old")
            per_rank_metrics = self.learner.get(
                self.learner.call_each_async("train_step", args),
                self.cfg.run.step_timeout_s,
                f"step {step} training",
            )
        except WorkerError as exc:
            # Learner ranks hold optimizer state: fail fast and say where to resume from.
            ckpt = checkpoint.latest(self.store)
            where = f"resume from {ckpt.uri} (run.resume=auto)" if ckpt else "no checkpoint yet"
            raise WorkerError(f"{exc}; {where}") from exc
        metrics = reduce_learner_metrics(per_rank_metrics, num_updates)
        metrics["train/rank_imbalance"] = shares.imbalance
        return metrics

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
        self.rollout.get(receives, timeout, f"{what} weight sync (receive)")
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

    def step(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        pending, self._prefetched = self._prefetched, None
        with _timed(metrics, "time/rollout_s"):
            batch = self._rollout_with_recovery(step, pending)
        shares = self._learner_shares(batch)
        # pi_old does not need the teacher: the learners recompute it while the teacher scores.
        recompute = self._recompute_old_logprobs_async(batch, shares)
        with _timed(metrics, "time/teacher_s"):
            scores = self._recovering(
                self.teacher, lambda: self._score(batch, step), f"step {step} teacher scoring"
            )
        self._prefetch_next(step)
        with _timed(metrics, "time/train_s"):
            metrics.update(self._train(batch, scores, step, shares, recompute))
        with _timed(metrics, "time/rollout_wait_s"):  # async: what training did not hide
            self._finish_prefetch(step)
        with _timed(metrics, "time/sync_s"):
            self._sync(step)
        tokens = batch.num_response_tokens
        lengths = batch.response_mask.sum(1).float()
        metrics.update(
            {
                "rollout/response_len_mean": float(lengths.mean()),
                "rollout/prompt_tokens": float(batch.prompt_mask.sum()),
                "rollout/finish_length_frac": batch.finish_reason.count("length")
                / batch.num_sequences,
                "teacher/tokens_per_s": tokens / metrics["time/teacher_s"],
                "teacher/entropy_exact": float(scores.entropy_is_exact),
                "train/tokens_per_s": tokens / metrics["time/train_s"],
                "rollout/weight_version": float(batch.weight_version),
                "rollout/version_lag": float(self.version - 1 - batch.weight_version),
                "time/step_s": sum(v for k, v in metrics.items() if k.startswith("time/")),
                "data/skipped_prompts": float(self.num_skipped_prompts),
            }
        )
        if not self.cfg.rollout.async_lag:  # async: generation overlaps training, unobserved here
            metrics["rollout/tokens_per_s"] = tokens / metrics["time/rollout_s"]
        return metrics

    # --- evaluation during training --------------------------------------------------------------

    def evaluation_due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return bool(every) and ((step + 1) % every == 0 or step == self.cfg.run.steps - 1)

    def evaluate(self, step: int) -> dict[str, float]:
        """The student after `step` (the weights the rollout workers hold since the sync) on the
        held-out prompts, judged by the held-out set (eopd_ray/driver/held_out.py)."""
        held = self.held_out
        assert held is not None, "evaluate() needs eval.every_steps > 0"
        args = held.requests(self.cfg.eval, len(self.rollout))
        ranks = list(range(len(args)))

        def generate() -> RolloutBatch:
            refs = self.rollout.call_each_async("generate", args)
            what = f"step {step} evaluation"
            return RolloutBatch.concat(
                self.rollout.get(refs, self.cfg.run.step_timeout_s, what, ranks=ranks)
            )

        started = time.perf_counter()
        batch = self._recovering(self.rollout, generate, f"step {step} evaluation")
        if batch.weight_version != self.version:
            raise VersionMismatch(
                f"step {step} evaluation: sampled with weight version {batch.weight_version}, "
                f"the student is at {self.version}"
            )
        metrics = held.score(batch) | {"time/eval_s": time.perf_counter() - started}
        log.info("step %d held-out evaluation: %s", step + 1, summary_line(metrics))
        return metrics

    # --- the run -------------------------------------------------------------------------------

    def run(self, progress: str = "auto") -> list[dict[str, float]]:
        """Steps from `start_step` (0, or after the resumed checkpoint) to `run.steps`, with
        checkpoints every `run.checkpoint_every` steps, at the end and on SIGTERM. `progress`:
        "bar" (tqdm), "lines" (a log line every `run.log_every_s`), "auto" (bar on a TTY)."""
        run = self.cfg.run
        resumed = self.start_step if self.start_step > 0 else None
        sinks = [
            JsonlSink(self.store, resume_from_step=resumed),
            TensorBoardSink(self.store),
            RayMetricsSink(run.name, run.id),
        ]
        history = []
        stop = StopOnSigterm()
        shown = StepProgress(self.start_step, run.steps, mode=progress, every_s=run.log_every_s)
        try:
            for step in range(self.start_step, run.steps):
                metrics = self.step(step)
                if self.evaluation_due(step):
                    metrics.update(self.evaluate(step))
                if self.config_changes:  # resumed with run.allow_config_change
                    metrics["run/config_changed"] = 1.0
                self.claim.check(f"step {step}")
                for sink in sinks:
                    sink.write(step, metrics)
                history.append(metrics)
                shown.update(step, metrics)
                last = step == run.steps - 1
                periodic = run.checkpoint_every and (step + 1) % run.checkpoint_every == 0
                if last or periodic or stop.requested:
                    self.save_checkpoint(step)
                if stop.requested:
                    log.warning("SIGTERM: checkpoint after step %d written; stopping", step)
                    self.stopped_early = True
                    break
            if run.export_hf and history and not self.stopped_early:
                self.export_hf()
        finally:
            shown.close()
            stop.restore()
            for sink in sinks:
                sink.close()
        return history

    def shutdown(self) -> None:
        import ray

        if self.claim is not None:
            self.claim.release()

        for group in (self.rollout, self.teacher, self.learner):
            for handle in group.handles if group else []:
                ray.kill(handle)
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
