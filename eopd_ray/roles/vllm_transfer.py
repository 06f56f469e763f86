"""vLLM's native weight-transfer protocol, with a backend of ours that takes in-process tensors.

Why: vLLM fuses checkpoint tensors (q/k/v -> `qkv_proj`, gate/up -> `gate_up_proj`) and its
layer-wise reload finalizes every module it touched at the end of each load call. Loading a sync
bucket per `reload_weights` call therefore corrupts any module whose parts straddle a bucket
boundary (the missing part is taken from uninitialized memory). The protocol

    llm.start_weight_update()                       # initialize the layer-wise reload once
    llm.update_weights({"update_info": {...}})      # one call per bucket, any split
    llm.finish_weight_update(weight_version="v")    # finalize every module once

brackets the reload once per sync, so buckets may cut anywhere, even inside one tensor's module.

vLLM 0.32 ships NCCL / CUDA-IPC backends only. Ours, `eopd_inprocess`, receives nothing itself:
the rollout worker receives each bucket (gloo broadcast, or the object store) and hands the
tensors to the in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), which loads them by
reference. So the CPU box runs the same start/update/finish lifecycle as a GPU cluster.
The reload keeps references to the given tensors until finish: a buffer handed over in one sync
must not be overwritten before that sync's finish (weight_sync.WeightReceiver keeps one buffer
per bucket, reused only at the next sync).

Imports vLLM: only the rollout worker's process imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

BACKEND = "eopd_inprocess"
# Hugging Face names of a tied embedding and the LM head that shares it (Llama, Qwen families).
TIED_EMBEDDING, TIED_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class InProcessInitInfo(WeightTransferInitInfo):
    """Nothing to set up: the tensors arrive as arguments of `update_weights`."""


@dataclass
class InProcessUpdateInfo(WeightTransferUpdateInfo):
    # (HF checkpoint name, tensor) pairs of one bucket, passed by reference in-process.
    named_tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)


class InProcessWeightTransferEngine(NCCLWeightTransferEngine):
    """Reuses the NCCL engine's start/finish (the layer-wise reload bracket); replaces what
    touches NCCL or `torch.accelerator` (which raise on a CPU-only torch)."""

    init_info_cls = InProcessInitInfo
    update_info_cls = InProcessUpdateInfo

    def init_transfer_engine(self, init_info: InProcessInitInfo) -> None:
        pass

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: InProcessUpdateInfo) -> None:
        named = [
            (name, t.to(self.device, non_blocking=True)) for name, t in update_info.named_tensors
        ]
        if getattr(self.model_config.hf_config, "tie_word_embeddings", False):
            # A tied checkpoint has no lm_head tensor, so the reload never touches (and never
            # re-processes) the LM head module: on CPU it kept its old packed weight. Load the
            # embedding under the head's name too.
            named += [(TIED_HEAD, t) for name, t in named if name == TIED_EMBEDDING]
        self.model.load_weights(named)

    def shutdown(self) -> None:
        pass


def keep_cpu_linear_weights() -> None:
    """On CPU, vLLM packs each linear layer's weight for oneDNN after loading and empties the
    parameter (`dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`), so the loaded
    weights could not be read back for the version checksum. Keep the parameter (twice the
    linear weights' memory, CPU only; the kernels still use the packed copy made from it)."""
    import vllm.model_executor.layers.utils as layer_utils

    dispatch = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(dispatch, "keeps_weights", False):
        return

    def dispatch_keeping_weights(layer: torch.nn.Module, remove_weight: bool) -> None:
        dispatch(layer, remove_weight=False)

    dispatch_keeping_weights.keeps_weights = True
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weights


def engine_checksum(model: torch.nn.Module, dtype: str) -> int:
    """eopd_ray.core.weight_checksum of the parameters one engine worker holds (`LLM.apply_model`),
    each in the sync dtype (vLLM-CPU keeps some biases in fp32). Under tensor parallelism a
    rank holds shards of the split parameters (vLLM marks them with `output_dim`/`input_dim`)
    and a copy of the others: those count on rank 0 only, so the ranks' checksums add up."""
    from vllm.distributed import get_tensor_model_parallel_rank

    from eopd_ray.core.weight_checksum import weights_checksum

    rank = get_tensor_model_parallel_rank()
    wanted = getattr(torch, dtype)
    return weights_checksum(
        p.detach().to(wanted)
        for _, p in model.named_parameters()
        if rank == 0 or hasattr(p, "output_dim") or hasattr(p, "input_dim")
    )


def register() -> str:
    """Register the backend in this process (once; vLLM refuses a second registration)."""
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, InProcessWeightTransferEngine)
    return BACKEND
