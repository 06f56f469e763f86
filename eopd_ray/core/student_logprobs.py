"""The student's full-vocabulary log-probs at a few ids per position, and its entropy: what
every loss variant reads from the student (`eopd_ray.core.loss`).

    ids = loss_ids(response_ids, teacher_topk_ids)           # (B, T, 1 + K)
    logprobs, entropy = student_logprobs_at(logits, ids, chunk_positions=256)

From (B, T, V) logits (plain, or chunked: never a second (B, T, V) float32 tensor), or, with
the fused LM head (`eopd_ray.core.fused_head`), as a `StudentAtIds` without any logits.
Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """To at least float32 (bf16/fp16 -> fp32; fp64 stays fp64 so tests can check to 1e-10)."""
    return x if x.dtype == torch.float64 else x.float()


class _ChunkedGatherLogSoftmax(torch.autograd.Function):
    """log_softmax(logits)[ids] and the entropy, computed `chunk` positions at a time.

    Never holds more than one (chunk, V) float32 block: the forward keeps only the per-position
    log-sum-exp, and the backward recomputes the softmax chunk by chunk:
        d logp[j] / d z = onehot(ids[j]) - softmax(z)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, chunk: int):
        b, t, _ = logits.shape  # (B, T, V), any float dtype
        dtype = upcast(logits[:0]).dtype
        gathered = logits.new_empty((b, t, ids.shape[-1]), dtype=dtype)  # (B, T, J)
        lse = logits.new_empty((b, t), dtype=dtype)  # (B, T)
        entropy = logits.new_empty((b, t), dtype=dtype)  # (B, T)
        for row in range(b):
            for s in range(0, t, chunk):
                z = upcast(logits[row, s : s + chunk])  # (c, V) fp32 upcast before softmax
                lse_c = torch.logsumexp(z, dim=-1)  # (c,)
                gathered[row, s : s + chunk] = (
                    z.gather(-1, ids[row, s : s + chunk]) - lse_c[:, None]
                )
                p = (z - lse_c[:, None]).exp_()  # (c, V): the second and last (c, V) buffer
                entropy[row, s : s + chunk] = lse_c - p.mul_(z).sum(-1)  # H = lse - sum p z
                lse[row, s : s + chunk] = lse_c
        ctx.save_for_backward(logits, ids, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return gathered, entropy

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor, _grad_entropy: torch.Tensor | None):
        logits, ids, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (B, T, V) in the logits' dtype
        b, t, _ = logits.shape
        for row in range(b):
            for s in range(0, t, ctx.chunk):
                e = s + ctx.chunk
                g = upcast(grad_gathered[row, s:e])  # (c, J)
                # One (c, V) buffer, updated in place; copy_ casts into grad without a temporary.
                p = logits[row, s:e].to(lse.dtype, copy=True)  # (c, V)
                p.sub_(lse[row, s:e, None]).exp_()
                gz = p.mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, ids[row, s:e], g)
                grad[row, s:e].copy_(gz)
        return grad, None, None


def student_logprobs_at(
    student_logits: torch.Tensor, ids: torch.Tensor, chunk_positions: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary student log-probs gathered at `ids`, and the student's entropy.

    student_logits (B, T, V) any float dtype; ids (B, T, J) int. Returns (B, T, J) log-probs with
    gradient, and (B, T) entropy in nats without gradient, both float32 (float64 for fp64 logits).
    `chunk_positions > 0` takes the memory-lean path (no second (B, T, V) fp32 tensor); 0 the
    plain path. Both agree to 1e-5.
    """
    ids = ids.long()
    if chunk_positions > 0:
        return _ChunkedGatherLogSoftmax.apply(student_logits, ids, chunk_positions)
    logprobs = torch.log_softmax(upcast(student_logits), dim=-1)  # (B, T, V) fp32
    entropy = -(logprobs.exp() * logprobs).sum(-1).detach()  # (B, T)
    return logprobs.gather(-1, ids), entropy


def loss_ids(response_ids: torch.Tensor, teacher_topk_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, 1 + K): where every variant reads the student's log-probs: the sampled token,
    then the teacher's top-K."""
    return torch.cat([response_ids[..., None].long(), teacher_topk_ids.long()], -1)


@dataclass(frozen=True)
class StudentAtIds:
    """The student's full-vocabulary log-probs at `loss_ids` (B, T, 1 + K), with gradient, and
    its entropy (B, T): what the fused LM head (eopd_ray/core/fused_head.py) hands the loss instead
    of (B, T, V) logits. Everything the variants compute follows from these two."""

    logprobs: torch.Tensor
    entropy: torch.Tensor

    def __getitem__(self, rows) -> StudentAtIds:
        return StudentAtIds(self.logprobs[rows], self.entropy[rows])
