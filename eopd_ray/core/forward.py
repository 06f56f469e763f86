"""Causal-LM forward passes restricted to the response positions (shared by learner and teacher).

A sequence is its prompt followed by its response, right-padded. Response token t is predicted by
the hidden state at position `prompt_len - 1 + t`; only those T rows go through the LM head, so
no (B, L, V) logits over the prompt are ever made.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eopd_ray.core.fused_head import head_logits
from eopd_ray.core.student_logprobs import upcast


def pack(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], num_positions: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids.

    Returns input_ids (B, L) int64, attention_mask (B, L) int64 and positions (B, T) int64: the
    index of the hidden state that predicts response token t (clamped into range at padding).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    b = len(prompts)
    input_ids = torch.zeros(b, width, dtype=torch.int64)
    attention_mask = torch.zeros(b, width, dtype=torch.int64)
    positions = torch.zeros(b, num_positions, dtype=torch.int64)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        ids = list(prompt) + list(response)
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, : len(ids)] = 1
        positions[row] = (len(prompt) - 1 + torch.arange(num_positions)).clamp(max=width - 1)
    return input_ids, attention_mask, positions


def response_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states at `positions` (B, T, H) of a Hugging Face causal LM; with `valid`
    (B, T) bool, only the valid positions' states, packed as (1, N, H): whatever follows (LM
    head, logits, loss) then does no work on padding."""
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # (B, L, H)
    index = positions[..., None].expand(-1, -1, hidden.shape[-1])  # (B, T, H)
    hidden = hidden.gather(1, index)
    return hidden if valid is None else hidden[valid][None]  # (1, N, H)


def response_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, T, V) that predict each response token, divided by `temperature` (the
    sampler's: their log-softmax is then the distribution the response was sampled from).
    With `valid` (B, T) bool: only those positions' logits, packed as (1, N, V).

    Numerics: at temperature 1 the logits keep the model's dtype (bf16 logits, as the sampler's
    engine makes); otherwise they are upcast to fp32 before the divide, the engine's order (vLLM's
    sampler upcasts, then divides): z / T rounded to bf16 is ~8e-3 nats mean, ~6e-2 max off per
    sampled token at T = 0.7. That (B, T, V) tensor is then fp32, twice the bf16 one; the fused
    head (`loss.fused_head`, the default) makes no (B, T, V) logits at all."""
    hidden = response_hidden_states(model, input_ids, attention_mask, positions, valid)
    logits = model.get_output_embeddings()(hidden)
    return logits if temperature == 1.0 else upcast(logits) / temperature


def scoring_lm_head(
    model: torch.nn.Module, vocab_rows: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight (V, H) and bias (V,) or None, cut to `vocab_rows`, as the teacher
    scores with them: logits always come out in fp32 (eopd_ray.core.fused_head.head_logits).

    On CUDA a 16-bit head stays as it is (a view, no copy): a bf16 GEMM that accumulates and
    writes fp32 (`torch.mm(..., out_dtype=torch.float32)`) is ~10x faster than an fp32 copy on
    the card's fp32 units (0.029 s vs 0.299 s for Qwen3-8B's head on 12,288 positions of an
    H200) and within 1e-4 nats of float64 in entropy: the hidden states and weights are bf16
    already. On CPU, where that kernel does not exist, an fp32 copy is made once per teacher
    (not per chunk; 2.5 GB for a bf16 Qwen3-8B); for an fp32 model it is a view. The bias is
    fp32 either way. Rows past `vocab_rows` (embedding padding) are dropped.
    """
    head = model.get_output_embeddings()
    weight = head.weight.detach()[:vocab_rows]
    if not (weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)):
        weight = weight.float()
    bias = getattr(head, "bias", None)
    return weight, None if bias is None else bias.detach()[:vocab_rows].float()


@torch.no_grad()
def score_response_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    top_k: int,
    chunk_positions: int,
    vocab_rows: int,
    temperature: float = 1.0,
    lm_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    merged_ids: tuple[int, int] | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's view of each response token, from one backbone pass: (B, T) log-prob of the
    token, (B, T) full-vocabulary entropy (nats), (B, T, K) top-K ids (int32) and log-probs, all
    of the tempered distribution softmax(logits / temperature) over the first `vocab_rows` ids.

    Numerics: the LM head's logits, the log-softmax and every reduction are float32 whatever the
    model dtype (`lm_head` = `scoring_lm_head(model, vocab_rows)`, computed here when None: an
    fp32 matmul, or on CUDA a 16-bit GEMM with fp32 accumulation and output); logits rounded to
    bf16 first would shift the entropy by up to ~0.08 nats at the paper's scale. The head runs on
    the T response positions only, `chunk_positions` at a time, so at most a few (B, chunk, V)
    fp32 blocks exist.

    `merged_ids = (keep, drop)` scores the two ids as one token reported as `keep`: its log-prob
    is logsumexp(logp[keep], logp[drop]), `drop` leaves the top-K, and a target `drop` is scored
    as `keep` (the student's one end token standing for two of the teacher's). The entropy stays
    that of the teacher's own, unmerged distribution.

    `valid` (B, T) bool: score only those positions, returned packed as (1, N, ...).
    """
    hidden = response_hidden_states(model, input_ids, attention_mask, positions, valid)
    targets = input_ids.gather(1, (positions + 1).clamp(max=input_ids.shape[1] - 1))  # (B, T)
    if valid is not None:
        targets = targets[valid][None]  # (1, N)
    weight, bias = lm_head if lm_head is not None else scoring_lm_head(model, vocab_rows)
    if merged_ids is not None:
        keep, drop = merged_ids
        targets = torch.where(targets == drop, keep, targets)
    b, t = targets.shape
    token_logprobs = torch.empty(b, t, device=hidden.device)
    entropy = torch.empty(b, t, device=hidden.device)
    topk_ids = torch.empty(b, t, top_k, dtype=torch.int32, device=hidden.device)
    topk_logprobs = torch.empty(b, t, top_k, device=hidden.device)
    for s in range(0, t, chunk_positions):
        e = s + chunk_positions
        h = hidden[:, s:e]
        logits = head_logits(h.reshape(-1, h.shape[-1]), weight, bias).view(*h.shape[:2], -1)
        if temperature != 1.0:
            logits /= temperature
        logp = torch.log_softmax(logits, dim=-1)  # (B, c, V)
        del logits
        entropy[:, s:e] = -logp.exp().mul_(logp).sum(-1)
        if merged_ids is not None:
            logp[..., keep] = torch.logaddexp(logp[..., keep], logp[..., drop])
            logp[..., drop] = -torch.inf
        token_logprobs[:, s:e] = logp.gather(-1, targets[:, s:e, None])[..., 0]
        top = logp.topk(top_k, dim=-1)  # sorted descending
        topk_ids[:, s:e] = top.indices.to(torch.int32)
        topk_logprobs[:, s:e] = top.values
    return token_logprobs, entropy, topk_ids, topk_logprobs


def rows_of(batch_ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The real (unpadded) ids of each row of a right-padded (B, N) tensor."""
    return [ids[m].tolist() for ids, m in zip(batch_ids, mask, strict=True)]
