"""Toy evaluation: entropy / FKL diagnostics against float64 loops; the whole evaluation on a
random model (numbers in range, every sample judged)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from eopd_ray.toy.chain import ChainTask
from eopd_ray.toy.evaluate import (
    _equal_length_chunks,
    _response_mask,
    default_max_new_tokens,
    evaluate_toy,
    pass_ks,
    token_diagnostics,
)
from eopd_ray.toy.models import TinyModelSpec, build_causal_lm, build_tokenizer
from eopd_ray.toy.task import GraphTask


def brute_force(model_logits, teacher_logits, mask, tau):
    n, t, v = model_logits.shape
    tokens = ent_sum = high = t_ent_sum = t_high = fkl_sum = 0.0
    for i in range(n):
        for j in range(t):
            if not mask[i, j]:
                continue
            zs = [math.exp(float(x)) for x in model_logits[i, j]]
            zt = [math.exp(float(x)) for x in teacher_logits[i, j]]
            ps = [z / sum(zs) for z in zs]
            pt = [z / sum(zt) for z in zt]
            h = -sum(p * math.log(p) for p in ps)
            ht = -sum(p * math.log(p) for p in pt)
            tokens += 1
            ent_sum += h
            high += h >= tau
            t_ent_sum += ht
            if ht >= tau:
                t_high += 1
                fkl_sum += sum(pt[k] * (math.log(pt[k]) - math.log(ps[k])) for k in range(v))
    return dict(
        tokens=tokens,
        student_entropy_sum=ent_sum,
        student_high=high,
        teacher_entropy_sum=t_ent_sum,
        teacher_high=t_high,
        fkl_high_sum=fkl_sum,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_diagnostics_match_float64_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    model = torch.randn(3, 5, 7, generator=gen) * 2
    teacher = torch.randn(3, 5, 7, generator=gen) * 2
    mask = torch.rand(3, 5, generator=gen) > 0.3
    got = token_diagnostics(model.float(), teacher.float(), mask, tau=0.8)
    want = brute_force(model.float(), teacher.float(), mask, tau=0.8)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key


def test_response_mask_stops_after_the_first_eos():
    eos = 9
    responses = torch.tensor([[1, 2, eos, eos], [1, eos, 3, eos], [1, 2, 3, 4]])
    assert _response_mask(responses, eos).tolist() == [
        [True, True, True, False],
        [True, True, False, False],
        [True, True, True, True],
    ]


def test_pass_ks():
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(1) == [1]


def test_evaluate_toy_on_random_models(tmp_path):
    task = GraphTask()
    tok = build_tokenizer(tmp_path / "tok", corpus=[task.labels], vocab_size=259)
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1)
    student = build_causal_lm(tmp_path / "student", tok, spec, seed=0)
    teacher = build_causal_lm(tmp_path / "teacher", tok, spec, seed=1)
    prompts = task.split()[1][:10]
    out = evaluate_toy(student, task, prompts, teacher_dir=teacher, samples=4, batch_prompts=4)
    assert out["prompts"] == 10
    # A random model over 259 tokens almost never writes a shortest path: near-zero accuracy,
    # near-uniform entropy (ln 259 = 5.56 nats), every token "high-entropy".
    assert out["avg@4"] <= 0.1 and out["pass@1"] == pytest.approx(out["avg@4"])
    assert 0 <= out["pass@1"] <= out["pass@2"] <= out["pass@4"] <= 1
    assert 5.0 < out["student/entropy_mean"] < math.log(259) + 1e-6
    assert out["student/frac_high_entropy"] == 1.0
    assert out["teacher/frac_high_entropy"] == 1.0 and out["fkl/high_entropy"] >= 0
    assert 1 <= out["response_tokens_mean"] <= 12
    again = evaluate_toy(student, task, prompts, teacher_dir=teacher, samples=4, batch_prompts=4)
    assert again == out  # seeded sampling


def test_evaluate_toy_on_the_chain_task_batches_prompts_of_each_length(tmp_path):
    """Chain prompts differ in length (5 to 9 items): they are sampled in equal-length batches,
    and every prompt is judged once, with up to the longest answer + EOS + slack new tokens."""
    task = ChainTask()
    tok = build_tokenizer(tmp_path / "tok", corpus=[task.alphabet], vocab_size=259)
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1)
    model = build_causal_lm(tmp_path / "model", tok, spec, seed=0)
    prompts = task.split()[1][:12]
    assert len({len(p) for p in prompts}) > 1
    chunks = list(_equal_length_chunks(AutoTokenizer.from_pretrained(model), prompts, 2))
    assert sorted(p for _, chunk in chunks for p in chunk) == sorted(prompts)
    assert all(len({len(p) for p in chunk}) == 1 and len(chunk) <= 2 for _, chunk in chunks)
    assert [start for start, _ in chunks] == [
        sum(len(c) for _, c in chunks[:i]) for i in range(len(chunks))
    ]
    assert default_max_new_tokens(task) == 42 and default_max_new_tokens(GraphTask()) == 12
    out = evaluate_toy(model, task, prompts, samples=2, batch_prompts=4)
    assert out["prompts"] == 12 and out["avg@2"] <= 0.1
    assert 1 <= out["response_tokens_mean"] <= 42
