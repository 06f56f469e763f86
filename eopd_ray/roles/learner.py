"""LearnerWorker: one rank of the DeepSpeed data-parallel group that trains the student.

Per step each rank receives its share of every mini-batch (the driver shards the step's sequences
so that update u uses rows [u*M, (u+1)*M) of the step, M = `learner.mini_batch_size`, split evenly
over the ranks). It then:

1. recomputes log pi_old of the sampled tokens with the current weights, before any update
   and in eval mode (no dropout: the sampler's policy), or takes the sampler's
   (`learner.old_logprobs: sampler`), logging the gap between the two;
2. runs one optimizer update per mini-batch, accumulating micro-batches
   (`learner.micro_batch_size`); every micro-batch loss is divided by the GLOBAL number of valid
   tokens in its mini-batch, so the summed gradient is that of the token-mean over the whole
   mini-batch, whatever the sharding.

Log-probs are those of the distribution the rollout sampled from: the student's logits are
divided by `rollout.temperature` (pi_old and the loss alike).

The DeepSpeed engine and its settings are built in `learner_engine`; weights leave the rank
(sync buckets, broadcast, HF export) through `learner_weights`.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Iterator

import torch

from eopd_ray.config import Config
from eopd_ray.core.forward import pack, rows_of
from eopd_ray.core.invariants import check_sampler_gap, sampler_gap_bound
from eopd_ray.core.loss import LOSSES, LossInputs, loss_hyperparameters
from eopd_ray.core.micro_batches import count_micro_batches
from eopd_ray.core.student_logprobs import StudentAtIds, loss_ids, student_logprobs_at
from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.errors import EopdError
from eopd_ray.ports import free_port
from eopd_ray.roles.learner_engine import build_engine, deepspeed_zero_stage
from eopd_ray.roles.learner_weights import LearnerWeights
from eopd_ray.roles.pi_old import has_dropout, old_from_update
from eopd_ray.roles.weight_sync import RetiredGroups, TensorMeta, WeightSender, plan_buckets
from eopd_ray.startup_heap import built_with_collector_paused
from eopd_ray.storage.learner_files import files_of_rank
from eopd_ray.storage.run_storage import BackgroundUpload, RunStorage
from eopd_ray.storage.sources import with_local_models
from eopd_ray.telemetry.ray_gauges import WorkerMetrics


class LearnerWorker(LearnerWeights):
    """One data-parallel rank (one Ray actor each)."""

    def __init__(self, cfg: Config, rank: int, world_size: int) -> None:
        cfg = with_local_models(cfg)  # hub ids and URIs: downloaded once per node
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.engine = None
        self.fused = False  # loss.fused_head, once setup has installed it
        self.checkpointing = False  # learner.gradient_checkpointing as set up (auto decided)
        self.sender: WeightSender | None = None
        self._retired_groups = RetiredGroups()  # see there: why groups are never destroyed
        self.buckets: list[list[TensorMeta]] = []
        self._sent_checksum: int | None = None  # of the last sync's weights (rank 0)
        self._gathered_checksum = 0  # of what _gathered_buckets has yielded so far
        self.step = 0
        self.metrics = WorkerMetrics("learner", rank, cfg.run.id)
        # (response ids of the shard, its pi_old) from recompute_old_logprobs, for train_step
        self._early_old: tuple[torch.Tensor, torch.Tensor] | None = None
        self._dropout = False  # the student has dropout (set up with the engine)
        self._upload: BackgroundUpload | None = None  # a checkpoint going up (object stores)

    def free_address(self) -> tuple[str, int]:
        """This node's address and a free port (rank 0 hosts the rendezvous)."""
        import ray

        return ray.util.get_node_ip_address(), free_port(host="")

    @built_with_collector_paused  # less CPU to start (eopd_ray.startup_heap)
    def setup(self, master_addr: str, master_port: int) -> bool:
        """Join the data-parallel group and build the DeepSpeed engine (all ranks at once).
        Returns whether the student has dropout (the driver's streamed step then keeps pi_old
        per group: `old_from_update`)."""
        self.engine, self.fused, self.checkpointing = build_engine(
            self.cfg, self.rank, self.world_size, master_addr, master_port
        )
        self._dropout = has_dropout(self.engine.module)
        self.buckets = plan_buckets(self._parameter_metas(), self.cfg.sync.bucket_bytes)
        return self._dropout

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(
        self, store: RunStorage, rel: str, background: bool = False
    ) -> dict[str, int]:
        """Every rank writes its DeepSpeed state (weights, optimizer, scheduler) to `rel`/learner
        on the run's storage: in place on a shared disk, else through node-local scratch space
        that each rank uploads itself (no shared mount needed). With `background` (an object
        store), the upload runs in a thread while the next step trains; `upload_state` tells
        how it goes. Returns the files this rank wrote, relative to `rel`, with their sizes (the
        driver's commit checks they all arrived whole)."""
        self.wait_uploaded()  # at most one upload in flight
        local = store.staging(rel)
        self.engine.save_checkpoint(str(local), tag="learner", client_state={"step": self.step})
        written = _files_under(local)  # on a shared disk also other ranks' files: all real
        if background and not store.is_local:
            self._upload = BackgroundUpload(store, local, rel)
        else:
            store.publish(local, rel)
        return written

    def upload_state(self) -> str:
        """ "none", "running", "done", or the error of the background upload (then cleared)."""
        upload = self._upload
        if upload is None:
            return "none"
        if upload.running:
            return "running"
        self._upload = None
        return "done" if upload.error is None else str(upload.error)

    def wait_uploaded(self) -> None:
        """Block until the background upload (if any) ends; raise its error."""
        upload, self._upload = self._upload, None
        if upload is not None:
            upload.join()

    def load_checkpoint(self, store: RunStorage, rel: str) -> int:
        """Restore every rank's state from the checkpoint at `rel`; returns the steps trained."""
        # From an object store: this rank's ZeRO shard and the shared files, not every rank's.
        local = store.fetch(rel, keep=files_of_rank(self.rank))
        try:
            path, client = self.engine.load_checkpoint(str(local), tag="learner")
        finally:
            if not store.is_local:
                shutil.rmtree(local, ignore_errors=True)
        if path is None:
            raise EopdError(
                f"learner[{self.rank}]: no DeepSpeed checkpoint under {store.show(rel)}"
            )
        self.step = int(client["step"])
        return self.step

    def check_storage(self, store: RunStorage, marker: str, token: str) -> None:
        """The driver wrote `token` to `marker`: a rank that cannot read it back would write its
        checkpoint shards where the driver never looks (a local path on another node)."""
        try:
            seen = store.read_text(marker)
        except OSError:
            seen = None
        if seen != token:
            raise EopdError(
                f"learner[{self.rank}] on node {socket.gethostname()} cannot see the run "
                f"directory {store.uri} the driver writes (a local path on another machine?): "
                "set run.output_dir to a filesystem every node mounts (NFS, the KubeRay "
                "checkpoint volume) or to a URI such as s3://bucket/run or gs://bucket/run"
            )

    # --- training ------------------------------------------------------------------------------

    def _fixed_plan(self, num_sequences: int) -> list[list[list[int]]]:
        """The plan without one from the driver: the shard holds each update's rows as one
        contiguous block of mini_batch_size / world_size, cut into fixed counts."""
        lrn = self.cfg.learner
        per_rank = lrn.mini_batch_size // self.world_size
        return [
            count_micro_batches(range(start, start + per_rank), lrn.micro_batch_size)
            for start in range(0, num_sequences, per_rank)
        ]

    def _micro_batch(
        self, shard: RolloutBatch, scores: TeacherScores | None, rows: list[int]
    ) -> tuple[RolloutBatch, TeacherScores | None]:
        """Rows of the shard; under a token budget cut to their own longest sequence."""
        mb = shard.select(rows)
        mb_scores = scores.select(rows) if scores is not None else None
        if self._budgeted:
            mb = mb.trimmed()
            if mb_scores is not None:
                mb_scores = mb_scores.narrowed(mb.response_ids.shape[1])
        return mb, mb_scores

    @property
    def _budgeted(self) -> bool:
        return self.cfg.learner.max_tokens_per_micro_batch is not None

    def _logits(self, batch: RolloutBatch, at: torch.Tensor | None = None):
        """Tempered response logits through the engine (see the module docstring): (b, T, V),
        or under a token budget only the real response positions', packed as (1, N, V).
        `at` (b, T, J) with the fused head: StudentAtIds (log-probs at those ids) instead."""
        device = self.engine.device
        prompts = rows_of(batch.prompt_ids, batch.prompt_mask)
        responses = rows_of(batch.response_ids, batch.response_mask)
        ids, attention, positions = pack(prompts, responses, batch.response_ids.shape[1])
        valid = batch.response_mask.to(device) if self._budgeted else None
        args = (ids.to(device), attention.to(device), positions.to(device))
        if at is None or not self.fused:
            return self.engine(*args, valid=valid)
        at = self._packed(batch.response_mask, at).to(device)
        return StudentAtIds(*self.engine(*args, valid=valid, ids=at))

    def _packed(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(b, T, ...) -> what matches `_logits`: itself, or under a budget (1, N, ...)."""
        return x[mask][None] if self._budgeted else x

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode (no dropout: the policy the rollout engines sample from), no autograd; the
        previous mode afterwards. Forwards still go through the engine: under ZeRO-3 each is a
        collective, so every rank must run the same number of them."""
        was_training = self.engine.training
        self.engine.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.engine.train(was_training)

    def recompute_old_logprobs(self, shard: RolloutBatch, plan: list[list[list[int]]]) -> None:
        """Recompute pi_old of the shard the next `train_step` will get (with the same plan),
        before the teacher's scores exist: the driver overlaps it with teacher scoring. Nothing
        to do when `train_step` takes pi_old from its update's forward."""
        if self._old_from_update(plan):
            self._early_old = None
            return
        self._early_old = (shard.response_ids, self._recompute_old_logprobs(shard, plan))

    def _old_from_update(self, plan: list[list[list[int]]]) -> bool:
        """pi_old can be the update's own forward, detached (learner.old_logprobs_from_update):
        one update in the plan (the weights stay those that sampled until it is applied; every
        rank's plan has the same number of updates, so the ranks agree) and no dropout (that
        forward runs in train mode)."""
        return old_from_update(self.cfg.learner, len(plan), self._dropout)

    def _sampled_logprobs(self, student, mask: torch.Tensor, response_ids: torch.Tensor):
        """log pi(y_t) of the sampled tokens from `_logits`' output, in its layout (packed
        under a token budget): what pi_old is."""
        if isinstance(student, StudentAtIds):
            return student.logprobs[..., 0]  # the sampled token is the first of loss_ids
        ids = self._packed(mask, response_ids).to(student.device)
        lp, _ = student_logprobs_at(student, ids[..., None], self.cfg.loss.chunk_positions)
        return lp[..., 0]

    def old_logprobs(self, shard: RolloutBatch, plan: list[list[list[int]]]) -> torch.Tensor:
        """log pi_old of `shard`'s sampled tokens, returned (a streamed step: the driver sends
        each rollout group as it arrives and hands the rows back with `train_step`)."""
        return self._recompute_old_logprobs(shard, plan)

    def _recompute_old_logprobs(
        self, shard: RolloutBatch, plan: list[list[list[int]]]
    ) -> torch.Tensor:
        """log pi_old of the sampled tokens (tempered), in eval mode, micro-batch by micro-batch
        as `plan` cuts them (empty ones too: every rank runs the same number of forwards)."""
        out = torch.zeros_like(shard.sampler_logprobs)
        with self._eval_mode():
            for rows in (mb for update in plan for mb in update):
                mb, _ = self._micro_batch(shard, None, rows or [0])
                student = self._logits(mb, at=mb.response_ids[..., None])
                if not rows:
                    continue  # a placeholder: the forward only keeps ZeRO-3's gathers in step
                mask = mb.response_mask
                lp = self._sampled_logprobs(student, mask, mb.response_ids).float().cpu()
                t = mb.response_ids.shape[1]
                if self._budgeted:  # packed: back to the rows' valid positions
                    block = torch.zeros(mask.shape)
                    block[mask] = lp[0]
                    out[rows, :t] = block
                else:
                    out[rows, :t] = lp * mask
        return out

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[j] | ids[:j]) for j >= 1 at temperature 1, in eval mode: the weight-sync
        probe the driver compares with every rollout engine's. Every rank must call it under
        ZeRO-3 (the forward gathers parameters)."""
        device = self.engine.device
        input_ids, attention, positions = pack([ids[:1]], [ids[1:]], len(ids) - 1)
        with self._eval_mode():
            logits = self.engine(
                input_ids.to(device), attention.to(device), positions.to(device), temperature=1.0
            )  # (1, L-1, V)
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            return logp.gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()

    def _gradient_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def train_step(
        self,
        shard: RolloutBatch,
        scores: TeacherScores,
        tokens_per_update: list[int],
        plan: list[list[list[int]]] | None = None,
        old_logprobs: torch.Tensor | None = None,
    ) -> list[dict[str, float]]:
        """All optimizer updates of one step on this rank's shard. `plan[u]` lists update u's
        micro-batches as rows of the shard (the driver's eopd_ray.core.micro_batches plan; [] = a
        zero-weight placeholder keeping the ranks' collectives in step); None: fixed counts of
        contiguous rows. `old_logprobs`: the shard's pi_old, already recomputed (`old_logprobs`
        per streamed group). Returns one metrics dict per micro-batch (the driver reduces them
        over micro-batches and ranks)."""
        cfg = self.cfg
        started = time.perf_counter()
        scores.check_matches(shard)
        plan = plan if plan is not None else self._fixed_plan(shard.num_sequences)
        self.engine.train()
        old = shard.sampler_logprobs
        gap, overlapped = 0.0, 0.0
        # pi_old from this update's own forward (checked before the update is applied, below)
        from_update = old_logprobs is None and self._old_from_update(plan)
        if from_update:
            self._early_old = None
        if cfg.learner.old_logprobs == "recompute" and not from_update:
            early, self._early_old = self._early_old, None
            if old_logprobs is not None:  # per streamed group, as the groups arrived
                old, overlapped = old_logprobs, 1.0
            elif early is not None and torch.equal(early[0], shard.response_ids):
                old = early[1]  # recomputed while the teacher scored (recompute_old_logprobs)
                overlapped = 1.0
            else:
                old = self._recompute_old_logprobs(shard, plan)
            mask = shard.response_mask
            gap = float((old - shard.sampler_logprobs).abs()[mask].sum())
            mean_gap = gap / max(1, int(mask.sum()))
            check_sampler_gap(mean_gap, sampler_gap_bound(cfg), self.step, f"learner[{self.rank}]")
        fn = LOSSES[cfg.loss.name]
        gen = torch.Generator().manual_seed(cfg.learner.seed * 7919 + self.step * 31 + self.rank)
        hp = dict(
            clip_eps=cfg.loss.clip_eps,
            entropy_threshold=cfg.loss.entropy_threshold,
            fkl_coef=cfg.loss.fkl_coef,
            jsd_beta=cfg.loss.jsd_beta,
            chunk_positions=cfg.loss.chunk_positions,
            generator=gen,
        )
        results = []
        for update, micro_batches in enumerate(plan):
            for index, rows in enumerate(micro_batches):
                boundary = index == len(micro_batches) - 1
                # Micro-batch counts may differ between updates: say where the update ends.
                self.engine.set_gradient_accumulation_boundary(boundary)
                mb, mb_scores = self._micro_batch(shard, scores, rows or [0])
                logits = self._logits(mb, at=loss_ids(mb.response_ids, mb_scores.topk_ids))
                device = self.engine.device
                t = mb.response_ids.shape[1]
                mask = mb.response_mask

                def packed(x: torch.Tensor, mask=mask, device=device) -> torch.Tensor:
                    return self._packed(mask, x).to(device)

                if from_update:  # the weights that sampled: nothing has been applied yet
                    mb_old = self._sampled_logprobs(logits, mask, mb.response_ids).detach()
                    if rows:
                        sampler = packed(mb.sampler_logprobs)
                        gap += float((mb_old - sampler).abs()[packed(mask)].sum())
                else:
                    mb_old = packed(old[rows or [0], :t])
                inputs = LossInputs(
                    student_logits=logits,
                    response_ids=packed(mb.response_ids),
                    response_mask=packed(mask),
                    old_logprobs=mb_old,
                    teacher_logprobs=packed(mb_scores.token_logprobs),
                    teacher_entropy=packed(mb_scores.entropy),
                    teacher_topk_ids=packed(mb_scores.topk_ids),
                    teacher_topk_logprobs=packed(mb_scores.topk_logprobs),
                )
                out = fn(
                    inputs,
                    num_valid_tokens=tokens_per_update[update],
                    **loss_hyperparameters(fn, **hp),
                )
                if not torch.isfinite(out.loss):
                    raise EopdError(
                        f"learner[{self.rank}]: non-finite loss ({float(out.loss)}) at step "
                        f"{self.step}, update {update}; no update was applied. Check the "
                        f"teacher's scores and learner.lr ({cfg.learner.lr})"
                    )
                # DeepSpeed averages gradients over ranks; the loss is already a global
                # token-mean. A placeholder contributes a zero gradient.
                weight = self.world_size if rows else 0.0
                self.engine.backward(out.loss * weight, scale_wrt_gas=False)
                if from_update and boundary:  # before the only update of the step is applied
                    mean_gap = gap / max(1, int(shard.response_mask.sum()))
                    worker = f"learner[{self.rank}]"
                    check_sampler_gap(mean_gap, sampler_gap_bound(cfg), self.step, worker)
                # Without ZeRO DeepSpeed clips in place and keeps no norm: measure it first.
                unclipped_norm = (
                    self._gradient_norm() if boundary and deepspeed_zero_stage(cfg) == 0 else None
                )
                self.engine.step()
                # A placeholder has no tokens; when it ends the update (equalize_counts puts
                # them last) it still carries the update's learner/* metrics.
                metrics = (
                    dict(out.metrics, update=float(update)) if rows else {"tokens/num_valid": 0.0}
                )
                if boundary:
                    norm = self.engine.get_global_grad_norm()
                    metrics["learner/grad_norm"] = float(
                        norm if norm is not None else unclipped_norm
                    )
                    metrics["learner/lr"] = float(self.engine.get_lr()[0])
                if rows or boundary:
                    results.append(metrics)
        results[0]["opd/sampler_gap_sum"] = gap
        results[0]["learner/old_logprobs_overlapped"] = overlapped
        results[0]["learner/old_logprobs_from_update"] = float(from_update)
        self.step += 1
        self.metrics.throughput("train", shard.num_response_tokens, started)
        losses = [r["loss/total"] for r in results if "loss/total" in r]
        self.metrics.set("train/loss", sum(losses) / max(1, len(losses)))
        return results


def _files_under(root) -> dict[str, int]:
    """Files below local directory `root`, as `/`-joined paths relative to it, with their sizes."""
    from pathlib import Path

    root = Path(root)
    return {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
