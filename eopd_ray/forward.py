"""Causal-LM forward passes restricted to the response positions (shared by learner and teacher).

A sequence is its prompt followed by its response, right-padded. Response token t is predicted by
the hidden state at position `prompt_len - 1 + t`; only those T rows go through the LM head, so
no (B, L, V) logits over the prompt are ever made.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
) -> torch.Tensor:
    """Final hidden states at `positions` (B, T, H) of a Hugging Face causal LM."""
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # (B, L, H)
    index = positions[..., None].expand(-1, -1, hidden.shape[-1])  # (B, T, H)
    return hidden.gather(1, index)


def response_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Logits (B, T, V) that predict each response token."""
    hidden = response_hidden_states(model, input_ids, attention_mask, positions)
    return model.get_output_embeddings()(hidden)


@torch.no_grad()
def score_response_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    top_k: int,
    chunk_positions: int,
    vocab_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's view of each response token, from one backbone pass: (B, T) log-prob of the
    token, (B, T) full-vocabulary entropy (nats), (B, T, K) top-K ids (int32) and log-probs.

    The LM head runs on the T response positions only, `chunk_positions` at a time, so at most a
    (B, chunk, V) fp32 block exists. Rows past `vocab_rows` (embedding padding) are dropped.
    """
    hidden = response_hidden_states(model, input_ids, attention_mask, positions)  # (B, T, H)
    targets = input_ids.gather(1, (positions + 1).clamp(max=input_ids.shape[1] - 1))  # (B, T)
    lm_head = model.get_output_embeddings()
    b, t = positions.shape
    token_logprobs = torch.empty(b, t, device=hidden.device)
    entropy = torch.empty(b, t, device=hidden.device)
    topk_ids = torch.empty(b, t, top_k, dtype=torch.int32, device=hidden.device)
    topk_logprobs = torch.empty(b, t, top_k, device=hidden.device)
    for s in range(0, t, chunk_positions):
        e = s + chunk_positions
        logits = lm_head(hidden[:, s:e]).float()[..., :vocab_rows]  # (B, c, V)
        logp = torch.log_softmax(logits, dim=-1)
        entropy[:, s:e] = -(logp.exp() * logp).sum(-1)
        token_logprobs[:, s:e] = logp.gather(-1, targets[:, s:e, None])[..., 0]
        top = logp.topk(top_k, dim=-1)
        topk_ids[:, s:e] = top.indices.to(torch.int32)
        topk_logprobs[:, s:e] = top.values
    return token_logprobs, entropy, topk_ids, topk_logprobs


def rows_of(batch_ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The real (unpadded) ids of each row of a right-padded (B, N) tensor."""
    return [ids[m].tolist() for ids, m in zip(batch_ids, mask, strict=True)]
