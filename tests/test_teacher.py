"""TeacherWorker (in-process, no Ray): exact scores at the right positions, O(T*K) payload,
EOS mapping, teacher templates, and the vocabulary check."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eopd_ray.config import config_from_dict
from eopd_ray.core.prompts import render_prompt
from eopd_ray.core.wire import RolloutBatch
from eopd_ray.roles.teacher import TeacherWorker, VocabularyMismatch


def make_cfg(pair, **teacher):
    student, teacher_dir = pair
    return config_from_dict(
        {
            "model": {"student_path": str(student), "teacher_path": str(teacher_dir)},
            "data": {"toy_prompts": 8, **teacher.pop("data", {})},
            "teacher": {"top_k": 8, "chunk_positions": 3, "micro_batch_size": 2, **teacher},
        }
    )


def ragged_batch(plen=(5, 3, 4), rlen=(7, 2, 5), seed=0, vocab=320) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    b, p, t = len(plen), max(plen), max(rlen)
    pm = torch.arange(p)[None] < torch.tensor(plen)[:, None]
    rm = torch.arange(t)[None] < torch.tensor(rlen)[:, None]
    return RolloutBatch(
        prompt_ids=torch.randint(3, vocab, (b, p), generator=g) * pm,
        prompt_mask=pm,
        response_ids=torch.randint(3, vocab, (b, t), generator=g) * rm,
        response_mask=rm,
        sampler_logprobs=torch.zeros(b, t),
        prompt_index=torch.arange(b),
        finish_reason=("length",) * b,
        weight_version=0,
    )


def brute_force(model, prompt: list[int], response: list[int]):
    """float64 log-softmax over the full vocabulary at every position of prompt + response."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    rows = logp[len(prompt) - 1 : len(prompt) - 1 + len(response)]  # row t predicts response[t]
    return rows, -(rows.exp() * rows).sum(-1)


def test_scores_match_a_full_forward_at_the_same_positions(tiny_pair):
    worker = TeacherWorker(make_cfg(tiny_pair), rank=0)
    batch = ragged_batch()
    scores = worker.score(batch)
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval()
    for b in range(batch.num_sequences):
        prompt = batch.prompt_ids[b][batch.prompt_mask[b]].tolist()
        response = batch.response_ids[b][batch.response_mask[b]].tolist()
        rows, entropy = brute_force(model, prompt, response)
        n = len(response)
        sampled = rows.gather(-1, torch.tensor(response)[:, None])[:, 0]
        torch.testing.assert_close(
            scores.token_logprobs[b, :n].double(), sampled, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(scores.entropy[b, :n].double(), entropy, atol=1e-5, rtol=0)
        top = rows.topk(8, -1)
        torch.testing.assert_close(
            scores.topk_logprobs[b, :n].double(), top.values, atol=1e-5, rtol=0
        )
        assert (scores.topk_ids[b, :n].long() == top.indices).float().mean() > 0.99
        assert (scores.entropy[b, n:] == 0).all()  # padding is zeroed


def test_payload_is_k_times_8_plus_8_bytes_per_token(tiny_pair):
    worker = TeacherWorker(make_cfg(tiny_pair), rank=0)
    batch = ragged_batch()
    scores = worker.score(batch)
    b, t = batch.response_ids.shape
    assert scores.nbytes == b * t * (8 * 8 + 8)
    vocab = AutoModelForCausalLM.from_pretrained(tiny_pair[1]).config.vocab_size
    assert scores.nbytes < b * t * vocab * 4 / 10  # far below full logits


def test_student_eos_stands_for_both_end_tokens(tiny_pair):
    """The response's student EOS is fed as the teacher's; the two end tokens are scored as one
    token under the student's id: merged with logsumexp, once in the top-K, sorted."""
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    src, dst = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert (src, dst) == (0, 2)
    vocab = len(tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval()
    batch = ragged_batch(plen=(4, 5), rlen=(3, 6))
    batch.response_ids[0, 2] = src
    batch.response_ids[1, 5] = src
    for k in (8, vocab - 1):  # V - 1: every id but the teacher's EOS, so both ends are in range
        cfg = make_cfg(tiny_pair, top_k=k, student_eos_token_id=src, teacher_eos_token_id=dst)
        scores = TeacherWorker(cfg, 0).score(batch)
        for b, end in ((0, 2), (1, 5)):
            prompt = batch.prompt_ids[b][batch.prompt_mask[b]].tolist()
            response = batch.response_ids[b][batch.response_mask[b]].tolist()
            rows, entropy = brute_force(model, prompt, [dst if x == src else x for x in response])
            merged = rows.clone()
            merged[:, src] = torch.logaddexp(rows[:, src], rows[:, dst])
            merged[:, dst] = -torch.inf
            n = len(response)
            assert scores.token_logprobs[b, end].item() == pytest.approx(
                merged[end, src].item(), abs=1e-5
            )
            torch.testing.assert_close(
                scores.topk_logprobs[b, :n].double(), merged.topk(k, -1).values, atol=5e-5, rtol=0
            )
            torch.testing.assert_close(scores.entropy[b, :n].double(), entropy, atol=1e-5, rtol=0)
            ids = scores.topk_ids[b, :n]
            assert (ids != dst).all()
            assert all(len(set(r)) == k for r in ids.tolist())
            if k == vocab - 1:  # the student's EOS carries the mass of both end tokens
                slot = (ids == src).int().argmax(-1, keepdim=True)
                merged_value = scores.topk_logprobs[b, :n].gather(-1, slot)[:, 0].double()
                torch.testing.assert_close(merged_value, merged[:, src], atol=5e-5, rtol=0)


def test_teacher_scores_the_tempered_distribution(tiny_pair):
    cfg = make_cfg(tiny_pair)
    tempered = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, temperature=0.7))
    scores = TeacherWorker(tempered, 0).score(batch := ragged_batch(plen=(4,), rlen=(6,)))
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval()
    with torch.no_grad():
        logits = model(
            torch.tensor([batch.prompt_ids[0].tolist() + batch.response_ids[0].tolist()])
        )
    rows = torch.log_softmax(logits.logits[0, 3:9].double() / 0.7, -1)
    sampled = rows.gather(-1, batch.response_ids[0][:, None])[:, 0]
    torch.testing.assert_close(scores.token_logprobs[0].double(), sampled, atol=5e-5, rtol=0)
    torch.testing.assert_close(
        scores.entropy[0].double(), -(rows.exp() * rows).sum(-1), atol=5e-5, rtol=0
    )
    torch.testing.assert_close(
        scores.topk_logprobs[0].double(), rows.topk(8, -1).values, atol=5e-5, rtol=0
    )


def test_bf16_teacher_on_cpu_keeps_one_fp32_lm_head(tiny_pair):
    cfg = make_cfg(tiny_pair)
    bf16 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bfloat16"))
    worker = TeacherWorker(bf16, 0)
    weight, bias = worker.lm_head
    assert worker.model.dtype == torch.bfloat16 and weight.dtype == torch.float32 and bias is None
    assert weight.shape == (worker.vocab_rows, worker.model.config.hidden_size)
    assert worker.score(ragged_batch()).entropy.dtype == torch.float32


def test_teacher_template_re_renders_the_raw_prompt(tiny_pair):
    cfg = make_cfg(tiny_pair, data={"teacher_template": "chat_no_think"})
    worker = TeacherWorker(cfg, 0)
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    raw = render_prompt("what is 2 + 3?", "raw", tok)
    batch = ragged_batch(plen=(len(raw),), rlen=(4,))
    batch.prompt_ids[0] = torch.tensor(raw)
    chat = render_prompt("what is 2 + 3?", "chat_no_think", tok)
    assert worker._teacher_prompts(batch) == [chat]
    scores = worker.score(batch)
    rows, _ = brute_force(
        AutoModelForCausalLM.from_pretrained(tiny_pair[1]).eval(),
        chat,
        batch.response_ids[0].tolist(),
    )
    torch.testing.assert_close(
        scores.topk_logprobs[0].double(), rows.topk(8, -1).values, atol=1e-5, rtol=0
    )


def test_different_vocabularies_are_refused_at_start(tiny_pair, tmp_path):
    from eopd_ray.toy.models import build_tokenizer

    other = tmp_path / "teacher"
    shutil.copytree(tiny_pair[1], other)
    tok_dir = build_tokenizer(tmp_path / "tok", ["completely different corpus 12345"], 300)
    for f in tok_dir.iterdir():
        shutil.copy(f, other / f.name)
    with pytest.raises(VocabularyMismatch, match=r"model\.teacher_path"):
        TeacherWorker(make_cfg((tiny_pair[0], other)), 0)


def test_start_up_checks_name_the_key_and_the_fix(tiny_pair, tmp_path):
    from eopd_ray.errors import EopdError
    from eopd_ray.roles.teacher import check_model_pair

    check_model_pair(make_cfg(tiny_pair))
    with pytest.raises(EopdError, match=r"model\.teacher_path = .*\(no config\.json\)"):
        check_model_pair(make_cfg((tiny_pair[0], tmp_path / "nowhere")))
    plain = tmp_path / "plain"
    shutil.copytree(tiny_pair[1], plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(EopdError, match="no chat template"):
        check_model_pair(make_cfg((tiny_pair[0], plain), data={"teacher_template": "chat"}))


def test_token_budget_scores_equal_fixed_micro_batches(tiny_pair):
    """Sorted, budgeted forwards that put only real positions through the LM head give the same
    scores as fixed micro-batches over the full padded width."""
    batch = ragged_batch(plen=(5, 3, 4, 2, 6, 3), rlen=(7, 2, 5, 1, 7, 4), seed=3)
    fixed = TeacherWorker(make_cfg(tiny_pair, micro_batch_size=4), 0)
    budget = TeacherWorker(make_cfg(tiny_pair, max_tokens_per_micro_batch=16), 0)
    groups = budget._micro_batches(budget._teacher_prompts(batch), budget._teacher_responses(batch))
    assert len(groups) > 2  # several budgeted forwards, rows reordered by length
    a, b = fixed.score(batch), budget.score(batch)
    for name in ("token_logprobs", "entropy", "topk_logprobs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=0)
    assert torch.equal(a.topk_ids, b.topk_ids)


@pytest.mark.gpu
def test_bf16_teacher_on_cuda_scores_with_the_bf16_head_within_1e_3_of_float64(tiny_pair):
    """On CUDA no fp32 copy: a bf16 GEMM with fp32 output (issue 20), still within 1e-3 nats of
    a float64 brute force for the entropy, the token's log-prob and the top-K."""
    cfg = make_cfg(tiny_pair)
    gpu = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, dtype="bfloat16"),
        teacher=dataclasses.replace(cfg.teacher, gpus_per_worker=1),
    )
    worker = TeacherWorker(gpu, 0)
    weight, _ = worker.lm_head
    assert weight.is_cuda and weight.dtype == torch.bfloat16
    batch = ragged_batch()
    scores = worker.score(batch)
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[1], dtype=torch.bfloat16).double()
    for row in range(batch.num_sequences):
        n = int(batch.response_mask[row].sum())
        prompt = batch.prompt_ids[row][batch.prompt_mask[row]].tolist()
        rows, _ = brute_force(model.eval(), prompt, batch.response_ids[row, :n].tolist())
        torch.testing.assert_close(
            scores.entropy[row, :n].double().cpu(),
            -(rows.exp() * rows).sum(-1),
            atol=1e-3,
            rtol=0,
        )
        torch.testing.assert_close(
            scores.topk_logprobs[row, :n].double().cpu(),
            rows.topk(8, -1).values,
            atol=1e-3,
            rtol=0,
        )
