"""Tiny models: built offline in about a second, loadable by transformers and by vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from eopd_ray.toy.models import TinyModelSpec, build_causal_lm, build_tokenizer


def test_build_is_fast_and_deterministic(tmp_path):
    start = time.perf_counter()
    tok = build_tokenizer(tmp_path / "tok")
    a = build_causal_lm(tmp_path / "a", tok, TinyModelSpec(), seed=3)
    elapsed = time.perf_counter() - start
    b = build_causal_lm(tmp_path / "b", tok, TinyModelSpec(), seed=3)
    assert elapsed < 10, f"building a tiny model took {elapsed:.1f}s"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_pair_shares_one_tokenizer_and_vocab_matches(tiny_pair):
    student_dir, teacher_dir = tiny_pair
    tok_s = AutoTokenizer.from_pretrained(student_dir)
    tok_t = AutoTokenizer.from_pretrained(teacher_dir)
    assert tok_s.get_vocab() == tok_t.get_vocab()
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert student.config.vocab_size == teacher.config.vocab_size == len(tok_s)
    assert teacher.config.model_type == "qwen3" and student.config.model_type == "llama"
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert n_teacher > 2 * n_student
    text = "what is 12 + 30? \\boxed{42}"
    assert tok_s.decode(tok_s(text)["input_ids"]) == text  # byte-level: lossless round trip
    chat = tok_t.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert chat.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


_VLLM_GREEDY = r"""
import json, sys, torch
from vllm import LLM, SamplingParams
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
prompt = tok("question: what is 12 + 30? answer:")["input_ids"]
llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=128, seed=0,
          kv_cache_memory_bytes=16 * 2**20)
out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=12, temperature=0))
model = AutoModelForCausalLM.from_pretrained(path).eval()
ids = list(prompt)
with torch.no_grad():
    for _ in range(12):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
print(json.dumps({"vllm": list(out[0].outputs[0].token_ids), "hf": ids[len(prompt):]}))
"""


@pytest.mark.slow
def test_vllm_loads_the_tiny_models_and_greedy_matches_hf(tiny_pair):
    # vLLM's in-process engine changes its host process: run it in a child.
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
    for model_dir in tiny_pair:
        proc = subprocess.run(
            [sys.executable, "-c", _VLLM_GREEDY, str(model_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["vllm"] == result["hf"], (model_dir, result)
        assert len(result["hf"]) == 12
