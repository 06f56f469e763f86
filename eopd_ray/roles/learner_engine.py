"""The learner's DeepSpeed engine: the wrapped module, its config, optimizer and LR schedule.

    engine, fused, checkpointing = build_engine(cfg, rank, world_size, master_addr, port)

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

import math
import os

import torch

from eopd_ray.config import Config, total_updates
from eopd_ray.core.forward import response_hidden_states, response_logits
from eopd_ray.core.fused_head import install_fused_head


# The only non-tensor types in DeepSpeed 0.19's ZeRO checkpoint files.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _safe_torch_load(path: str, map_location=None):
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


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


def build_engine(cfg: Config, rank: int, world_size: int, master_addr: str, master_port: int):
    """Join the data-parallel group and build the DeepSpeed engine (all ranks at once). Returns
    (engine, whether the fused head is installed, whether gradient checkpointing is on)."""
    import deepspeed
    import deepspeed.ops
    from transformers import AutoModelForCausalLM

    on_gpu = cfg.learner.gpus_per_worker > 0
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",  # Ray gives each learner actor its own GPU(s): always device 0
    )
    # DeepSpeed would JIT-build a shared-memory allreduce (~45 s) on CPU; gloo alone is exact.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    torch.manual_seed(cfg.learner.seed + rank)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.student_path,
        dtype=getattr(torch, cfg.model.dtype),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    model.config.use_cache = False
    # The fused head replaces the head module before DeepSpeed wraps (and, under ZeRO-3,
    # partitions) the model, keeping its parameters and their names.
    fused = cfg.loss.fused_head and install_fused_head(model)
    checkpointing = gradient_checkpointing_on(cfg, model, on_gpu, world_size)
    if checkpointing:
        model.gradient_checkpointing_enable()
    lrn = cfg.learner
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=lrn.lr,
        betas=(lrn.adam_beta1, lrn.adam_beta2),
        eps=lrn.adam_eps,
        weight_decay=lrn.weight_decay,
        fused=on_gpu,  # one kernel per step on CUDA instead of a loop over tensors
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: lr_multiplier(cfg, update)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=ResponseLM(model, cfg.rollout.temperature, cfg.loss.chunk_positions or 256),
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size),
    )
    # DeepSpeed unpickles its checkpoint files; load them with weights_only=True instead.
    engine.checkpoint_engine.load = _safe_torch_load
    return engine, fused, checkpointing


def gradient_checkpointing_on(
    cfg: Config, model: torch.nn.Module, on_gpu: bool, world_size: int
) -> bool:
    """`learner.gradient_checkpointing`, with `auto` decided by eopd_ray.core.memory_plan."""
    setting = cfg.learner.gradient_checkpointing
    if setting != "auto":
        return setting
    if not on_gpu:
        return False
    from eopd_ray.core.memory_plan import checkpointing_needed, micro_batch_tokens

    return checkpointing_needed(
        micro_batch_tokens(cfg),
        model.config.num_hidden_layers,
        model.config.hidden_size,
        sum(p.numel() for p in model.parameters()),
        world_size,
        torch.cuda.get_device_properties(0).total_memory,
    )
