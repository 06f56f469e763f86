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

Every forward goes through `DeepSpeedEngine.forward` (the engine's module is `ResponseLM`, a thin
wrapper whose forward returns the response logits): that is where DeepSpeed registers its
backward hooks and where ZeRO-3 advances its micro-step counter. Calling the Hugging Face modules
directly made ZeRO-3 overwrite its gradient partitions at every micro-batch instead of adding to
them, so only the last micro-batch of an update counted. Parameter names for weight sync, export
and the sync buckets are the Hugging Face ones (`ResponseLM.hf`'s, without the `hf.` prefix);
DeepSpeed checkpoints store the wrapper's names (`hf.` + the HF name).

bf16 (`model.dtype: bfloat16`): DeepSpeed's default accumulates the micro-batch gradients and
all-reduces them in bf16. The config asks for fp32 accumulation and communication
(`data_types.grad_accum_dtype: fp32`, `communication_data_type: fp32`); DeepSpeed 0.19.8 takes
that with ZeRO-1 (its BF16_Optimizer: fp32 gradient buffer, fp32 master weights), ZeRO-2
(fp32 gradient partitions) and ZeRO-3 (fp32 gradient partitions). Without ZeRO it refuses the
mix (`_do_optimizer_sanity_check`: "unsupported mix of model_dtype and grad_accum_dtype"), so
`zero_stage: 0` with bf16 runs as ZeRO-1 (`deepspeed_zero_stage`): the same update, with the
fp32 master weights and optimizer state split over the ranks.

Gloo on CPU, NCCL on GPU; ZeRO stage from `learner.zero_stage`; torch AdamW (DeepSpeed's own
Adam would JIT-compile an op); constant or cosine LR with linear warm-up.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator

import torch

from eopd_ray.config import Config, total_updates
from eopd_ray.core.forward import pack, response_hidden_states, response_logits, rows_of
from eopd_ray.core.fused_head import install_fused_head
from eopd_ray.core.invariants import check_sampler_gap, sampler_gap_bound
from eopd_ray.core.loss import (
    LOSSES,
    LossInputs,
    StudentAtIds,
    loss_hyperparameters,
    loss_ids,
    student_logprobs_at,
)
from eopd_ray.core.micro_batches import count_micro_batches
from eopd_ray.core.weight_checksum import combine, weights_checksum
from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.errors import EopdError
from eopd_ray.roles.weight_sync import TensorMeta, WeightSender, plan_buckets
from eopd_ray.storage.run_storage import RunStorage
from eopd_ray.telemetry.ray_gauges import WorkerMetrics


# The only non-tensor types in DeepSpeed 0.19's ZeRO checkpoint files.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _safe_torch_load(path: str, map_location=None):
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def export_hf_model(gathered, buckets, rank: int, source_dir: str, directory: str) -> None:
    """Write gathered buckets as `model-0000i-of-0000n.safetensors` plus the index, and copy the
    source model's config, generation config and tokenizer files; rename into place at the end."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(directory)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.")) if rank == 0 else None
    weight_map, total = {}, 0
    for index, tensors in gathered:
        if tmp is None:
            continue
        name = f"model-{index + 1:05d}-of-{len(buckets):05d}.safetensors"
        named = {m.name: t.contiguous() for m, t in zip(buckets[index], tensors, strict=True)}
        save_file(named, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(named, name))
        total += sum(t.numel() * t.element_size() for t in named.values())
    if tmp is None:
        return
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    for src in Path(source_dir).iterdir():
        if src.is_file() and not src.name.startswith("model") and src.suffix != ".bin":
            shutil.copy2(src, tmp / src.name)  # config, generation config, tokenizer files
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _files_under(root) -> list[str]:
    """Files below local directory `root`, as `/`-joined paths relative to it."""
    from pathlib import Path

    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def lr_multiplier(cfg: Config, update: int) -> float:
    """LR / learner.lr at optimizer update `update` (0-based): linear warm-up, then constant or
    cosine decay to learner.min_lr_ratio at the last update."""
    lrn = cfg.learner
    if update < lrn.warmup_steps:
        return (update + 1) / lrn.warmup_steps
    if lrn.lr_schedule == "constant":
        return 1.0
    total = max(1, total_updates(cfg) - lrn.warmup_steps)
    progress = min(1.0, (update - lrn.warmup_steps) / total)
    return lrn.min_lr_ratio + (1 - lrn.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_zero_stage(cfg: Config) -> int:
    """The ZeRO stage the engine runs: `learner.zero_stage`, except bf16 without ZeRO, which runs
    as ZeRO-1 (DeepSpeed 0.19.8 accumulates gradients in fp32 only under ZeRO; module docstring)."""
    if cfg.model.dtype == "bfloat16" and cfg.learner.zero_stage == 0:
        return 1
    return cfg.learner.zero_stage


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    lrn = cfg.learner
    per_rank = lrn.mini_batch_size // world_size
    accumulation = per_rank // lrn.micro_batch_size
    bf16 = cfg.model.dtype == "bfloat16"
    config = {
        "train_micro_batch_size_per_gpu": lrn.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": lrn.micro_batch_size * accumulation * world_size,
        "zero_optimization": {"stage": deepspeed_zero_stage(cfg)},
        "gradient_clipping": lrn.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO
        "steps_per_print": 2**31 - 1,
    }
    if bf16:  # DeepSpeed's bf16 default would accumulate and all-reduce gradients in bf16
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config


class ResponseLM(torch.nn.Module):
    """The module DeepSpeed wraps: forward(input_ids, attention_mask, positions) -> the response
    logits (B, T, V) of the Hugging Face causal LM `hf`, divided by the sampling temperature;
    with `ids`, the log-probs at those ids and the entropy from the fused head instead
    (`loss.fused_head`, eopd_ray/core/fused_head.py: no logits are made)."""

    def __init__(self, hf: torch.nn.Module, temperature: float, chunk: int = 256) -> None:
        super().__init__()
        self.hf = hf
        self.temperature = temperature
        self.chunk = chunk

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        temperature: float | None = None,
        valid: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
    ):
        """`temperature` None: the sampling temperature given at construction. `valid` (B, T):
        only those positions, packed as (1, N, ...). `ids` (B, T, J) (packed: (1, N, J)):
        return (log-probs at ids (.., J), entropy (..)) through the fused head."""
        t = self.temperature if temperature is None else temperature
        if ids is None:
            return response_logits(self.hf, input_ids, attention_mask, positions, t, valid)
        hidden = response_hidden_states(self.hf, input_ids, attention_mask, positions, valid)
        return self.hf.get_output_embeddings()(hidden, ids=ids, temperature=t, chunk=self.chunk)


class LearnerWorker:
    """One data-parallel rank (one Ray actor each)."""

    def __init__(self, cfg: Config, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.engine = None
        self.fused = False  # loss.fused_head, once setup has installed it
        self.checkpointing = False  # learner.gradient_checkpointing as set up (auto decided)
        self.sender: WeightSender | None = None
        self.buckets: list[list[TensorMeta]] = []
        self._sent_checksum: int | None = None  # of the last sync's weights (rank 0)
        self._gathered_checksum = 0  # of what _gathered_buckets has yielded so far
        self.step = 0
        self.metrics = WorkerMetrics("learner", rank, cfg.run.id)
        # (response ids of the shard, its pi_old) from recompute_old_logprobs, for train_step
        self._early_old: tuple[torch.Tensor, torch.Tensor] | None = None

    def free_address(self) -> tuple[str, int]:
        """This node's address and a free port (rank 0 hosts the rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the data-parallel group and build the DeepSpeed engine (all ranks at once)."""
        import deepspeed
        import deepspeed.ops
        from transformers import AutoModelForCausalLM

        on_gpu = self.cfg.learner.gpus_per_worker > 0
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",  # Ray gives each learner actor its own GPU(s): always device 0
        )
        # DeepSpeed would JIT-build a shared-memory allreduce (~45 s) on CPU; gloo alone is exact.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        torch.manual_seed(self.cfg.learner.seed + self.rank)
        model = AutoModelForCausalLM.from_pretrained(
            self.cfg.model.student_path,
            dtype=getattr(torch, self.cfg.model.dtype),
            trust_remote_code=self.cfg.model.trust_remote_code,
        )
        model.config.use_cache = False
        # The fused head replaces the head module before DeepSpeed wraps (and, under ZeRO-3,
        # partitions) the model, keeping its parameters and their names.
        self.fused = self.cfg.loss.fused_head and install_fused_head(model)
        self.checkpointing = self._checkpointing(model, on_gpu)
        if self.checkpointing:
            model.gradient_checkpointing_enable()
        lrn = self.cfg.learner
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=lrn.lr,
            betas=(lrn.adam_beta1, lrn.adam_beta2),
            eps=lrn.adam_eps,
            weight_decay=lrn.weight_decay,
            fused=on_gpu,  # one kernel per step on CUDA instead of a loop over tensors
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda update: lr_multiplier(self.cfg, update)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=ResponseLM(
                model, self.cfg.rollout.temperature, self.cfg.loss.chunk_positions or 256
            ),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg, self.world_size),
        )
        self.buckets = plan_buckets(self._parameter_metas(), self.cfg.sync.bucket_bytes)
        # DeepSpeed unpickles its checkpoint files; load them with weights_only=True instead.
        self.engine.checkpoint_engine.load = _safe_torch_load

    def _checkpointing(self, model: torch.nn.Module, on_gpu: bool) -> bool:
        """`learner.gradient_checkpointing`, with `auto` decided by eopd_ray.core.memory_plan."""
        setting = self.cfg.learner.gradient_checkpointing
        if setting != "auto":
            return setting
        if not on_gpu:
            return False
        from eopd_ray.core.memory_plan import checkpointing_needed, micro_batch_tokens

        return checkpointing_needed(
            micro_batch_tokens(self.cfg),
            model.config.num_hidden_layers,
            model.config.hidden_size,
            sum(p.numel() for p in model.parameters()),
            self.world_size,
            torch.cuda.get_device_properties(0).total_memory,
        )

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, store: RunStorage, rel: str) -> list[str]:
        """Every rank writes its DeepSpeed state (weights, optimizer, scheduler) to `rel`/learner
        on the run's storage: in place on a shared disk, else through node-local scratch space
        that each rank uploads itself (no shared mount needed). Returns the files this rank
        wrote, relative to `rel` (the driver's commit checks they are all there)."""
        local = store.staging(rel)
        self.engine.save_checkpoint(str(local), tag="learner", client_state={"step": self.step})
        written = _files_under(local)  # on a shared disk also other ranks' files: all real
        store.publish(local, rel)
        return written

    def load_checkpoint(self, store: RunStorage, rel: str) -> int:
        """Restore every rank's state from the checkpoint at `rel`; returns the steps trained."""
        local = store.fetch(rel)
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

    def export_hf(self, store: RunStorage, rel: str = "hf") -> None:
        """The student as a Hugging Face model directory (sharded safetensors, one shard per sync
        bucket, config and tokenizer) at `rel`, written atomically by rank 0. Every rank must
        call it under ZeRO-3 (the gathers are collective)."""
        target = store.local_path(rel) if store.is_local else store.staging(rel) / "hf"
        export_hf_model(
            self._gathered_buckets(),
            self.buckets,
            self.rank,
            self.cfg.model.student_path,
            str(target),
        )
        if self.rank == 0 and not store.is_local:
            store.delete(rel)
            store.publish(target, rel)

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
        before the teacher's scores exist: the driver overlaps it with teacher scoring."""
        self._early_old = (shard.response_ids, self._recompute_old_logprobs(shard, plan))

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
                if isinstance(student, StudentAtIds):
                    lp = student.logprobs
                else:
                    ids = self._packed(mask, mb.response_ids).to(student.device)
                    chunk = self.cfg.loss.chunk_positions
                    lp, _ = student_logprobs_at(student, ids[..., None], chunk)
                lp = lp[..., 0].float().cpu()
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
    ) -> list[dict[str, float]]:
        """All optimizer updates of one step on this rank's shard. `plan[u]` lists update u's
        micro-batches as rows of the shard (the driver's eopd_ray.core.micro_batches plan; [] = a
        zero-weight placeholder keeping the ranks' collectives in step); None: fixed counts of
        contiguous rows. Returns one metrics dict per micro-batch (the driver reduces them over
        micro-batches and ranks)."""
        cfg = self.cfg
        started = time.perf_counter()
        scores.check_matches(shard)
        plan = plan if plan is not None else self._fixed_plan(shard.num_sequences)
        self.engine.train()
        old = shard.sampler_logprobs
        gap, overlapped = 0.0, 0.0
        if cfg.learner.old_logprobs == "recompute":
            early, self._early_old = self._early_old, None
            if early is not None and torch.equal(early[0], shard.response_ids):
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

                inputs = LossInputs(
                    student_logits=logits,
                    response_ids=packed(mb.response_ids),
                    response_mask=packed(mask),
                    old_logprobs=packed(old[rows or [0], :t]),
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
        self.step += 1
        self.metrics.throughput("train", shard.num_response_tokens, started)
        losses = [r["loss/total"] for r in results if "loss/total" in r]
        self.metrics.set("train/loss", sum(losses) / max(1, len(losses)))
        return results

    # --- weight sync ---------------------------------------------------------------------------

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The Hugging Face names (those of the checkpoint files vLLM and export_hf use)."""
        return list(self.engine.module.hf.named_parameters())

    def _parameter_metas(self) -> list[TensorMeta]:
        metas = []
        for name, p in self._named_parameters():
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 params report numel 0
            metas.append(TensorMeta(name, shape, self.cfg.model.dtype))
        return metas

    def sync_buckets(self) -> list[list[TensorMeta]]:
        return self.buckets

    def join_sync_group(self, address: str, port: int, world_size: int) -> None:
        """Rank 0 only: host the weight-broadcast group with the rollout workers."""
        self.sender = WeightSender.connect(
            address, port, world_size, self.buckets, self.cfg.sync.timeout_s
        )

    def _gathered_buckets(self) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Full parameters bucket by bucket. Under ZeRO-3 every rank must run this (each bucket
        is an all-gather every rank joins); other stages hold full parameters on every rank."""
        import deepspeed

        params = dict(self._named_parameters())
        self._gathered_checksum = 0
        for index, bucket in enumerate(self.buckets):
            tensors = [params[m.name] for m in bucket]
            gather = (
                deepspeed.zero.GatheredParameters(tensors, modifier_rank=None)
                if self.cfg.learner.zero_stage == 3
                else contextlib.nullcontext()
            )
            with gather:
                wire = [
                    t.detach().to(getattr(torch, m.dtype))
                    for t, m in zip(tensors, bucket, strict=True)
                ]
                # Checksummed where the weights are (the GPU: fast), before the copy to the host.
                self._gathered_checksum += weights_checksum(wire)
                out = [t.to("cpu") for t in wire]
                if self.cfg.learner.zero_stage == 3:  # the gathered storage is freed on exit
                    out = [
                        c.clone() if c.data_ptr() == t.data_ptr() else c
                        for c, t in zip(out, tensors, strict=True)
                    ]
                yield index, out

    def broadcast_weights(self) -> int:
        """Collective transport: rank 0 broadcasts every bucket. Returns the buckets sent."""
        sent = 0
        for index, tensors in self._gathered_buckets():
            if self.rank == 0:
                assert self.sender is not None, "join_sync_group was not called on rank 0"
                self.sender.send(index, tensors)
                sent += 1
            if self.cfg.learner.zero_stage != 3 and self.rank != 0:
                break  # nothing to gather on other ranks
        self._sent_checksum = combine([self._gathered_checksum]) if self.rank == 0 else None
        return sent

    def sent_weights_checksum(self) -> int | None:
        """Rank 0: eopd_ray.core.weight_checksum of the weights of the last sync, as sent (in
        model.dtype); every rollout engine must read the same back. Other ranks: None."""
        return self._sent_checksum

    def weight_buckets(self) -> list[list[tuple[str, torch.Tensor]]]:
        """Object-store transport: the buckets as (name, tensor) lists; empty except on rank 0.
        Under ZeRO-3 every rank must call it (the gathers are collective)."""
        if self.rank != 0 and self.cfg.learner.zero_stage != 3:
            return []
        out = []
        for index, tensors in self._gathered_buckets():
            names = [m.name for m in self.buckets[index]]
            out.append(list(zip(names, tensors, strict=True)))
        self._sent_checksum = combine([self._gathered_checksum]) if self.rank == 0 else None
        return out if self.rank == 0 else []
