"""Tiny models: built offline in about a second, loadable by transformers and by vLLM."""

from __future__ import annotations

import time

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
