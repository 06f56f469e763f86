"""The EOPD loss family, pure torch (no Ray, vLLM or DeepSpeed), exactly as in method.md.

Shape legend: B sequences, T response tokens, K teacher top-k, V vocabulary. Row t of every
(B, T, ...) input describes the distribution that predicts response token t, for the student and
the teacher alike: the gate, the FKL and the sampled-token log-probs all use the SAME position
(the public fork reads the top-K one position later than the entropy; we do not).

Every variant takes one `LossInputs` plus keyword-only hyperparameters and returns
`LossOutput(loss, metrics, gate)`:

    opd          L_opd                                   (PPO-clipped reverse KL, eq. 1)
    eopd         L_opd + alpha * 1[H_t >= tau] * L_fkl   (the method, eq. 3)
    eopd_all     L_opd + alpha * L_fkl                   (tau = 0 ablation)
    eopd_random  L_opd + alpha * random_gate * L_fkl     (same firing rate as the tau gate)
    fkl          L_fkl on every token                    (GKD with beta = 0, on the top-K)
    jsd          generalized JSD(beta) on the top-K      (GKD-style)

Reduction: token-mean over valid response tokens; every term is divided by ALL valid tokens
(`num_valid_tokens`, the global count under data parallelism), never by the gated ones.

Departures from the letter of the paper, all numerical safety: inputs at masked positions are
zeroed before use (so padding can hold -inf/NaN without poisoning gradients), and the PPO log-ratio
is clamped to [-20, 20] before exp (as verl does) so an extreme drift cannot overflow.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from eopd_ray.core.student_logprobs import StudentAtIds, loss_ids, student_logprobs_at

LOG_RATIO_CLAMP = 20.0


@dataclass
class LossOutput:
    loss: torch.Tensor  # () scalar, differentiable w.r.t. the student logits
    metrics: dict[str, float]  # per-step metric names from method.md, means over valid tokens
    gate: torch.Tensor  # (B, T) bool, where the FKL term fired (the tau gate for opd/fkl/jsd)


# ----------------------------------------------------------------------------- shared terms


class LossInputs(NamedTuple):
    """Everything a loss needs, at the response positions (row t predicts response token t)."""

    # (B, T, V) any float dtype, differentiable; or the student's log-probs already gathered
    # at loss_ids(response_ids, teacher_topk_ids) (StudentAtIds, the fused LM head's output)
    student_logits: torch.Tensor | StudentAtIds
    response_ids: torch.Tensor  # (B, T) int, the sampled tokens y_t
    response_mask: torch.Tensor  # (B, T) bool, True = a valid response token
    old_logprobs: torch.Tensor  # (B, T) log pi_old(y_t)
    teacher_logprobs: torch.Tensor  # (B, T) log pi_te(y_t)
    teacher_entropy: torch.Tensor  # (B, T) full-vocabulary teacher entropy H_t, nats
    teacher_topk_ids: torch.Tensor  # (B, T, K) int
    teacher_topk_logprobs: torch.Tensor  # (B, T, K) raw full-vocab logprobs (renormalized here)

    def select(self, rows: slice | torch.Tensor) -> LossInputs:
        """The same inputs for a subset of sequences (a data-parallel shard, a micro-batch)."""
        return LossInputs(*(x[rows] for x in self))


@dataclass
class _Terms:
    """Per-token quantities every variant combines; all (B, T) unless noted."""

    mask: torch.Tensor  # bool
    denom: torch.Tensor  # () number of valid tokens (global under data parallelism)
    old_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    teacher_entropy: torch.Tensor
    teacher_topk_logprobs: torch.Tensor  # (B, T, K) raw
    sampled_logprobs: torch.Tensor  # log pi_theta(y_t), with gradient
    student_topk_logprobs: torch.Tensor  # (B, T, K) full-vocab log pi_theta(x), with gradient
    student_entropy: torch.Tensor  # no gradient
    teacher_topk_renorm: torch.Tensor  # (B, T, K) log p~_te(x): teacher renormalized on its top-K


def _terms(x: LossInputs, num_valid_tokens: int | torch.Tensor | None, chunk: int) -> _Terms:
    mask = x.response_mask.bool()
    ids = loss_ids(x.response_ids, x.teacher_topk_ids)  # (B, T, 1 + K)
    if isinstance(x.student_logits, StudentAtIds):
        gathered, student_entropy = x.student_logits.logprobs, x.student_logits.entropy
        if gathered.shape != ids.shape:
            raise ValueError(f"student log-probs {tuple(gathered.shape)} at ids {tuple(ids.shape)}")
    else:
        gathered, student_entropy = student_logprobs_at(x.student_logits, ids, chunk)
    dtype = gathered.dtype

    def clean(v: torch.Tensor) -> torch.Tensor:  # zero padding so -inf/NaN there cannot leak
        m = mask if v.dim() == 2 else mask[..., None]
        return torch.where(m, v.to(dtype), torch.zeros((), dtype=dtype, device=v.device))

    topk = clean(x.teacher_topk_logprobs)  # (B, T, K)
    if num_valid_tokens is None:
        num_valid_tokens = mask.sum()
    denom = torch.as_tensor(num_valid_tokens, dtype=dtype, device=mask.device).clamp(min=1)
    return _Terms(
        mask=mask,
        denom=denom,
        old_logprobs=clean(x.old_logprobs),
        teacher_logprobs=clean(x.teacher_logprobs),
        teacher_entropy=clean(x.teacher_entropy),
        teacher_topk_logprobs=topk,
        sampled_logprobs=gathered[..., 0],
        student_topk_logprobs=gathered[..., 1:],
        student_entropy=student_entropy,
        teacher_topk_renorm=topk - torch.logsumexp(topk, dim=-1, keepdim=True),
    )


def _token_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def _opd_per_token(t: _Terms, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: max(-r A, -clip(r, 1-eps, 1+eps) A), A = stopgrad(log pi_te - log pi_old).
    Returns the (B, T) loss and the (B, T) bool 'clipped branch active' indicator."""
    advantage = (t.teacher_logprobs - t.old_logprobs).detach()
    log_ratio = (t.sampled_logprobs - t.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped = -ratio * advantage
    clipped = -ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantage
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _fkl_per_token(t: _Terms) -> torch.Tensor:
    """Eq. 2: sum_{x in TopK} p~_te(x) (log p~_te(x) - log pi_theta(x)).
    The student's log-probs are full-vocabulary values, NOT renormalized over the top-K."""
    log_p = t.teacher_topk_renorm  # (B, T, K)
    return (log_p.exp() * (log_p - t.student_topk_logprobs)).sum(-1)  # (B, T)


def _jsd_per_token(t: _Terms, beta: float) -> torch.Tensor:
    """Generalized JSD(beta) on the top-K support, both sides renormalized there (TRL's GKD form):
    beta * KL(P || M) + (1 - beta) * KL(Q || M), M = beta P + (1 - beta) Q, P teacher, Q student.
    beta = 0 is KL(P || Q) (forward), beta = 1 is KL(Q || P) (reverse)."""
    log_p = t.teacher_topk_renorm
    log_q = t.student_topk_logprobs - torch.logsumexp(t.student_topk_logprobs, -1, keepdim=True)

    def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if beta == 0.0:
        return kl(log_p, log_q)
    if beta == 1.0:
        return kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def _finish(
    t: _Terms,
    losses: dict[str, torch.Tensor],
    fired: torch.Tensor | None,
    entropy_threshold: float,
    clipped: torch.Tensor | None,
) -> LossOutput:
    """Sum the per-token terms (each divided by the valid-token count) and compute the metrics.
    `losses` maps metric name -> (B, T) per-token term already including its coefficient/gate.
    `fired` is the (B, T) mask the FKL term was applied on (eopd variants), None otherwise.

    `gate/frac` and `fkl/on_gated` always describe the tau gate 1[H_t >= tau], whatever fired,
    so every variant's curves are comparable (method.md: EOPD lowers the FKL on high-entropy
    tokens; under eopd_all that must not read as 'FKL on every token'). `gate/fired_frac` is the
    share of valid tokens the FKL term was applied on (eopd variants only)."""
    parts = {name: _token_sum(term, t.mask) / t.denom for name, term in losses.items()}
    total = torch.stack(list(parts.values())).sum()
    tau_gate = _entropy_gate(t, entropy_threshold)
    with torch.no_grad():
        m = t.mask
        n = m.sum().clamp(min=1).to(t.denom.dtype)
        fkl = _fkl_per_token(t)
        values = {f"loss/{name}": v for name, v in parts.items()}
        values["loss/total"] = total
        if clipped is not None:
            values["opd/clip_frac"] = _token_sum(clipped.float(), m) / n
        values["opd/approx_kl"] = _token_sum(t.old_logprobs - t.sampled_logprobs, m) / n
        values["kl/reverse_sampled"] = _token_sum(t.old_logprobs - t.teacher_logprobs, m) / n
        values["gate/frac"] = tau_gate.sum() / n
        if fired is not None:
            values["gate/fired_frac"] = (fired & m).sum() / n
        values["gate/teacher_entropy_mean"] = _token_sum(t.teacher_entropy, m) / n
        values["fkl/on_gated"] = _token_sum(fkl, tau_gate) / tau_gate.sum().clamp(min=1)
        values["student/entropy_mean"] = _token_sum(t.student_entropy, m) / n
        values["student/frac_high_entropy"] = (
            (t.student_entropy >= entropy_threshold) & m
        ).sum() / n
        values["topk/teacher_mass"] = _token_sum(t.teacher_topk_logprobs.exp().sum(-1), m) / n
        values["topk/student_mass"] = _token_sum(t.student_topk_logprobs.exp().sum(-1), m) / n
        values["tokens/num_valid"] = m.sum()
        keys = list(values)
        floats = torch.stack([v.detach().double().reshape(()) for v in values.values()]).tolist()
    gate = tau_gate if fired is None else fired & t.mask
    return LossOutput(loss=total, metrics=dict(zip(keys, floats, strict=True)), gate=gate)


def _entropy_gate(t: _Terms, entropy_threshold: float) -> torch.Tensor:
    """Hard gate on the teacher's absolute entropy: 1[H_t >= tau] (B, T) bool."""
    return (t.teacher_entropy >= entropy_threshold) & t.mask


def _random_gate_like(
    gate: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """A gate that fires on exactly as many valid tokens as `gate`, chosen uniformly at random."""
    valid = mask.flatten().nonzero().squeeze(-1)  # (N_valid,)
    num_fire = int(gate.sum())
    order = torch.randperm(valid.numel(), generator=generator, device="cpu").to(valid.device)
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    out[valid[order[:num_fire]]] = True
    return out.view_as(mask)


# ----------------------------------------------------------------------------- the variants

# Each variant takes `LossInputs` and only the hyperparameters it uses, keyword-only.
# `num_valid_tokens` is the token-mean denominator: the GLOBAL valid-token count under data
# parallelism (default: this call's own count). `chunk_positions > 0` selects the memory-lean
# student log-softmax (see `student_logprobs_at`).


def opd_loss(
    inputs: LossInputs,
    *,
    clip_eps: float = 0.2,
    entropy_threshold: float = 0.8,
    num_valid_tokens: int | torch.Tensor | None = None,
    chunk_positions: int = 0,
) -> LossOutput:
    """OPD (eq. 1): PPO-clipped reverse KL on every valid token, divided by all valid tokens.
    The top-K inputs and `entropy_threshold` only feed the diagnostics (gate/*, fkl/on_gated)."""
    t = _terms(inputs, num_valid_tokens, chunk_positions)
    opd, clipped = _opd_per_token(t, clip_eps)
    return _finish(t, {"opd": opd}, None, entropy_threshold, clipped)


def _eopd_with_gate(
    t: _Terms, gate: torch.Tensor, clip_eps: float, fkl_coef: float, entropy_threshold: float
) -> LossOutput:
    """Eq. 3: L_opd + alpha * gate * L_fkl, each summed over valid tokens / all valid tokens."""
    opd, clipped = _opd_per_token(t, clip_eps)
    fkl = _fkl_per_token(t) * gate.to(t.denom.dtype)  # gated per-token FKL (B, T)
    return _finish(t, {"opd": opd, "fkl": fkl_coef * fkl}, gate, entropy_threshold, clipped)


def eopd_loss(
    inputs: LossInputs,
    *,
    clip_eps: float = 0.2,
    entropy_threshold: float = 0.8,
    fkl_coef: float = 1.0,
    num_valid_tokens: int | torch.Tensor | None = None,
    chunk_positions: int = 0,
) -> LossOutput:
    """EOPD (eq. 3): OPD on every token plus alpha * top-K FKL where the teacher's entropy >= tau.
    Metric `loss/fkl` is alpha * sum(gate * L_fkl) / num_valid_tokens."""
    t = _terms(inputs, num_valid_tokens, chunk_positions)
    gate = _entropy_gate(t, entropy_threshold)
    return _eopd_with_gate(t, gate, clip_eps, fkl_coef, entropy_threshold)


def eopd_all_loss(
    inputs: LossInputs,
    *,
    clip_eps: float = 0.2,
    entropy_threshold: float = 0.8,
    fkl_coef: float = 1.0,
    num_valid_tokens: int | torch.Tensor | None = None,
    chunk_positions: int = 0,
) -> LossOutput:
    """Ablation tau = 0: the FKL term on every valid token. `entropy_threshold` only feeds the
    diagnostics."""
    t = _terms(inputs, num_valid_tokens, chunk_positions)
    return _eopd_with_gate(t, t.mask, clip_eps, fkl_coef, entropy_threshold)


def eopd_random_loss(
    inputs: LossInputs,
    *,
    clip_eps: float = 0.2,
    entropy_threshold: float = 0.8,
    fkl_coef: float = 1.0,
    num_valid_tokens: int | torch.Tensor | None = None,
    chunk_positions: int = 0,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Ablation: the entropy gate replaced by a random gate that fires on exactly as many valid
    tokens of this batch as 1[H_t >= tau] would, drawn with `generator`."""
    t = _terms(inputs, num_valid_tokens, chunk_positions)
    gate = _random_gate_like(_entropy_gate(t, entropy_threshold), t.mask, generator)
    return _eopd_with_gate(t, gate, clip_eps, fkl_coef, entropy_threshold)


def fkl_loss(
    inputs: LossInputs,
    *,
    entropy_threshold: float = 0.8,
    num_valid_tokens: int | torch.Tensor | None = None,
    chunk_positions: int = 0,
) -> LossOutput:
    """Top-K forward KL (eq. 2) on every valid token, no reverse-KL term; token-mean."""
    t = _terms(inputs, num_valid_tokens, chunk_positions)
    return _finish(t, {"fkl": _fkl_per_token(t)}, None, entropy_threshold, None)


def jsd_loss(
    inputs: LossInputs,
    *,
    jsd_beta: float = 0.5,
    entropy_threshold: float = 0.8,
    num_valid_tokens: int | torch.Tensor | None = None,
    chunk_positions: int = 0,
) -> LossOutput:
    """Generalized JSD(jsd_beta) on the teacher's top-K support, every valid token; token-mean."""
    t = _terms(inputs, num_valid_tokens, chunk_positions)
    return _finish(t, {"jsd": _jsd_per_token(t, jsd_beta)}, None, entropy_threshold, None)


LOSSES: dict[str, Callable[..., LossOutput]] = {
    "opd": opd_loss,
    "eopd": eopd_loss,
    "eopd_all": eopd_all_loss,
    "eopd_random": eopd_random_loss,
    "fkl": fkl_loss,
    "jsd": jsd_loss,
}


def loss_hyperparameters(fn: Callable[..., LossOutput], **available: object) -> dict[str, object]:
    """The subset of `available` keyword arguments that loss `fn` accepts (config -> call)."""
    accepted = inspect.signature(fn).parameters
    return {k: v for k, v in available.items() if k in accepted}
