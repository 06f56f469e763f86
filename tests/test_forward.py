"""forward.score_response_tokens: fp32 LM head whatever the model dtype, the rollout temperature,
an LM-head bias, embedding padding, and merged ids, against float64 brute force over the full
vocabulary (computed from the same backbone hidden states and the same weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from eopd_ray.core.forward import (
    pack,
    response_hidden_states,
    score_response_tokens,
    scoring_lm_head,
)

K = 8


def tiny_teacher(tiny_pair, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(tiny_pair[1], dtype=dtype).eval()


def packed(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 3, 7)]
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 4, 12)]
    return pack(prompts, responses, 12)


def reference(model, ids, att, pos, vocab_rows: int, temperature: float = 1.0):
    """float64 log-softmax over the first `vocab_rows` ids (B, T, V), and the target ids (B, T)."""
    with torch.no_grad():
        hidden = response_hidden_states(model, ids, att, pos).double()  # (B, T, H)
        head = model.get_output_embeddings()
        logits = hidden @ head.weight.double().T
        if head.bias is not None:
            logits = logits + head.bias.double()
    logp = torch.log_softmax(logits[..., :vocab_rows] / temperature, -1)
    targets = ids.gather(1, (pos + 1).clamp(max=ids.shape[1] - 1))
    return logp, targets


def check(scored, logp, targets, atol: float) -> None:
    token_logprobs, entropy, topk_ids, topk_logprobs = scored
    entropy_ref = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(entropy.double(), entropy_ref, atol=atol, rtol=0)
    top = logp.topk(K, -1)
    torch.testing.assert_close(topk_logprobs.double(), top.values, atol=atol, rtol=0)
    torch.testing.assert_close(
        token_logprobs.double(), logp.gather(-1, targets[..., None])[..., 0], atol=atol, rtol=0
    )
    # Ids agree wherever the reference's neighbours are not tied within the tolerance.
    gaps = (top.values[..., :-1] - top.values[..., 1:]).abs()
    clear = torch.cat([gaps[..., :1], torch.minimum(gaps[..., 1:], gaps[..., :-1])], -1) > atol
    assert (topk_ids.long() == top.indices)[..., :-1][clear].all()


def test_bf16_teacher_is_scored_in_fp32(tiny_pair):
    model = tiny_teacher(tiny_pair, torch.bfloat16)
    vocab = model.config.vocab_size
    ids, att, pos = packed(vocab)
    logp, targets = reference(model, ids, att, pos, vocab)
    check(score_response_tokens(model, ids, att, pos, K, 5, vocab), logp, targets, atol=1e-3)
    # The test can fail: rounding the logits to bf16 before the fp32 log-softmax (the old code)
    # misses the entropy by more than the tolerance on this model.
    with torch.no_grad():
        hidden = response_hidden_states(model, ids, att, pos)
        rounded = torch.log_softmax(model.get_output_embeddings()(hidden).float(), -1)
    rounded_entropy = -(rounded.exp() * rounded).sum(-1).double()
    assert (rounded_entropy - -(logp.exp() * logp).sum(-1)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 5e-5), (torch.bfloat16, 1e-3)])
def test_logits_are_divided_by_the_temperature(tiny_pair, dtype, atol):
    model = tiny_teacher(tiny_pair, dtype)
    vocab = model.config.vocab_size
    ids, att, pos = packed(vocab, seed=1)
    logp, targets = reference(model, ids, att, pos, vocab, temperature=0.7)
    scored = score_response_tokens(model, ids, att, pos, K, 4, vocab, temperature=0.7)
    check(scored, logp, targets, atol=atol)
    plain = score_response_tokens(model, ids, att, pos, K, 4, vocab)
    assert (scored[1] - plain[1]).abs().max() > 0.05  # the temperature changes the entropy


def test_bf16_response_logits_are_divided_by_the_temperature_in_fp32(tiny_pair):
    """The learner's plain path (no fused head): bf16 logits upcast to fp32, then divided by the
    temperature, the sampler's order (vLLM upcasts, then divides), so its log-probs are those of
    a float64 brute force from the same bf16 logits (issue 31, finding 8)."""
    from eopd_ray.core.forward import response_logits
    from eopd_ray.core.student_logprobs import student_logprobs_at

    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.bfloat16).eval()
    head = model.get_output_embeddings()
    vocab = model.config.vocab_size
    ids, att, pos = packed(vocab, seed=4)
    with torch.no_grad():  # logits of the spread a trained model's have (std 3)
        std = head(response_hidden_states(model, ids, att, pos)).float().std()
        head.weight.copy_(head.weight.float() * 3 / std)
        tempered = response_logits(model, ids, att, pos, temperature=0.7)  # (B, T, V)
        raw = head(response_hidden_states(model, ids, att, pos))  # (B, T, V) bf16
    exact = torch.log_softmax(raw.double() / 0.7, -1)  # (B, T, V)
    targets = ids.gather(1, (pos + 1).clamp(max=ids.shape[1] - 1))[..., None]  # (B, T, 1)
    for chunk in (0, 5):  # the plain and the chunked log-softmax
        got, _ = student_logprobs_at(tempered, targets, chunk)
        assert (got.double() - exact.gather(-1, targets)).abs().max() < 1e-5
    # The old order, z / T rounded to bf16, is far outside the bound: the test can fail.
    old, _ = student_logprobs_at(raw / 0.7, targets, 0)
    assert (old.double() - exact.gather(-1, targets)).abs().max() > 1e-3
    assert tempered.dtype == torch.float32


def test_lm_head_bias_and_embedding_padding(tiny_pair):
    model = tiny_teacher(tiny_pair)
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.randn(head.out_features, generator=torch.Generator()))
    rows = model.config.vocab_size - 20  # pretend the last 20 rows are embedding padding
    ids, att, pos = packed(rows, seed=2)
    logp, targets = reference(model, ids, att, pos, rows)
    lm_head = scoring_lm_head(model, rows)
    assert lm_head[0].shape[0] == rows and lm_head[1] is not None and lm_head[1].shape == (rows,)
    scored = score_response_tokens(model, ids, att, pos, K, 3, rows, lm_head=lm_head)
    check(scored, logp, targets, atol=5e-5)
    assert (scored[2] < rows).all()


def test_merged_ids_score_two_ids_as_one(tiny_pair):
    model = tiny_teacher(tiny_pair)
    vocab = model.config.vocab_size
    ids, att, pos = packed(vocab, seed=3)
    keep, drop = 0, 2
    ids[0, pos[0, 3] + 1] = drop  # response token 3 of row 0 is the dropped id
    logp, targets = reference(model, ids, att, pos, vocab)
    merged = logp.clone()
    merged[..., keep] = torch.logaddexp(logp[..., keep], logp[..., drop])
    merged[..., drop] = -torch.inf
    targets = torch.where(targets == drop, keep, targets)
    for k in (K, vocab - 1):  # K = V - 1: every id but the dropped one, so `keep` is included
        scored = score_response_tokens(model, ids, att, pos, k, 5, vocab, merged_ids=(keep, drop))
        token_logprobs, entropy, topk_ids, topk_logprobs = scored
        torch.testing.assert_close(
            entropy.double(), -(logp.exp() * logp).sum(-1), atol=5e-5, rtol=0
        )  # the entropy stays that of the teacher's own, unmerged vocabulary
        assert (topk_ids != drop).all()
        assert all(len(set(r)) == k for r in topk_ids.flatten(0, 1).tolist())  # ids unique
        torch.testing.assert_close(
            topk_logprobs.double(), merged.topk(k, -1).values, atol=5e-5, rtol=0
        )
        assert (topk_logprobs[..., :-1] >= topk_logprobs[..., 1:]).all()
        torch.testing.assert_close(
            token_logprobs.double(),
            merged.gather(-1, targets[..., None])[..., 0],
            atol=5e-5,
            rtol=0,
        )
    want = torch.logaddexp(logp[0, 3, keep], logp[0, 3, drop])
    assert token_logprobs[0, 3].item() == pytest.approx(want.item(), abs=1e-5)
