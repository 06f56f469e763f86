"""When the learner needs gradient checkpointing: `learner.gradient_checkpointing: auto`.

    checkpointing_needed(tokens=20480, layers=28, hidden=2048, parameters=1.7e9,
                         world_size=2, zero_stage=2, device_bytes=80e9)   -> True

Checkpointing recomputes every layer's forward in the backward: about a third more compute
(0.397 vs 0.330 s per step for the Qwen3-1.7B shape on an H200), so it should be on only where
the activations would not fit. The rule, with the micro-batch's tokens (its token budget, or
micro_batch_size x the longest prompt + response):

    activations = tokens x layers x hidden x ACTIVATION_BYTES
    state       = parameters x (2 + 16 / world_size)     (bf16 weights; fp32 master weights,
                                                          gradients and AdamW moments, ZeRO-sharded)
    on  <=>  activations > HEADROOM x (device_bytes - state)

ACTIVATION_BYTES = 64 is measured, not modelled: on an H200 the Qwen3-1.7B shape without
checkpointing peaked at 90 GB for 16 x 1,024 tokens with about 27 GB of weights and optimizer
state, so ~63 GB for 16,384 tokens x 28 layers x 2,048 = 64 bytes per token, layer and hidden
unit (bf16 activations of attention and the SwiGLU MLP, plus what autograd keeps around them).
HEADROOM = 0.6 leaves room for the allocator's fragmentation, the fused head's blocks and
NCCL's buffers. ZeRO-3 partitions the bf16 weights too (counted as if not: a safe side).
On CPU (no device memory to run out of, and no GPU to speed up) `auto` means off.

Pure: imports neither torch's CUDA state nor Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

ACTIVATION_BYTES = 64
HEADROOM = 0.6


def checkpointing_needed(
    tokens: int,
    layers: int,
    hidden: int,
    parameters: float,
    world_size: int,
    device_bytes: float,
) -> bool:
    """Whether a micro-batch of `tokens` needs checkpointing on a device of `device_bytes`."""
    activations = tokens * layers * hidden * ACTIVATION_BYTES
    state = parameters * (2 + 16 / max(1, world_size))
    return activations > HEADROOM * max(0.0, device_bytes - state)


def micro_batch_tokens(cfg) -> int:
    """The most tokens one learner micro-batch can hold under `cfg`."""
    lrn = cfg.learner
    if lrn.max_tokens_per_micro_batch is not None:
        return lrn.max_tokens_per_micro_batch
    return lrn.micro_batch_size * (cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
