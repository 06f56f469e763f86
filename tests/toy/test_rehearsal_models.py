"""The rehearsal assets have the shape facts of the real Qwen3 setup (configs/rehearsal.yaml)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from eopd_ray.config import load_config
from eopd_ray.toy.rehearsal import ensure_rehearsal_assets
from eopd_ray.toy.rehearsal_text import (
    END_THINK_ID,
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    THINK_ID,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "configs" / "rehearsal.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal") / "assets"
    started = time.perf_counter()
    paths = ensure_rehearsal_assets(root)
    return paths, time.perf_counter() - started


def _tensors(model_dir: Path) -> dict[str, tuple[list[int], str]]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        return {
            k: (list(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype())
            for k in fh.keys()  # noqa: SIM118 (safe_open is not iterable)
        }


def _config(student: Path, teacher: Path, prompts: Path, *overrides: str):
    return load_config(
        CONFIG,
        [
            f"model.student_path={student}",
            f"model.teacher_path={teacher}",
            f"data.train_path={prompts}",
            *overrides,
        ],
    )


def test_build_is_quick_idempotent_and_leaves_no_staging(assets):
    (student, teacher, prompts), elapsed = assets
    assert elapsed < 30, f"building the rehearsal assets took {elapsed:.1f}s"
    root = student.parent
    stamp = (root / "rehearsal.json").stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_rehearsal_assets(root) == (student, teacher, prompts)
    assert time.perf_counter() - started < 1
    assert (root / "rehearsal.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert sorted(p.name for p in root.parent.iterdir()) == ["assets"]  # no staging left
    assert sorted(p.name for p in root.iterdir()) == [
        "math_train.parquet",
        "rehearsal.json",
        "student",
        "teacher",
    ]


def test_qwen3_vocabulary_layout_and_special_ids(assets):
    (student, teacher, _), _ = assets
    tok_s, tok_t = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(teacher)
    assert tok_s.get_vocab() == tok_t.get_vocab()  # check_shared_vocabulary's condition
    assert len(tok_s) == len(tok_t) == 151669  # Qwen3's tokenizer length
    for tok in (tok_s, tok_t):
        ids = tok.convert_tokens_to_ids(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
        )
        assert ids == [ENDOFTEXT_ID, IM_START_ID, IM_END_ID, THINK_ID, END_THINK_ID]
    assert (tok_s.eos_token_id, tok_t.eos_token_id) == (ENDOFTEXT_ID, IM_END_ID)
    for path, eos, stops in (
        (student, ENDOFTEXT_ID, ENDOFTEXT_ID),
        (teacher, IM_END_ID, [IM_END_ID, ENDOFTEXT_ID]),  # as Qwen3-8B's generation config
    ):
        cfg = AutoConfig.from_pretrained(path)
        assert cfg.vocab_size == 151936 > len(tok_s)  # 267 padding rows, as Qwen3
        assert cfg.model_type == "qwen3" and cfg.head_dim in (32, 64)
        assert cfg.eos_token_id == eos
        gen = json.loads((path / "generation_config.json").read_text())
        assert gen["eos_token_id"] == stops
    text = "What is $12 + 30$? Let's think step by step ... \\boxed{42}"
    assert tok_s.decode(tok_s(text, add_special_tokens=False)["input_ids"]) == text
    chat = tok_t.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert chat.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = tok_t(chat, add_special_tokens=False)["input_ids"]
    assert ids[0] == IM_START_ID and IM_END_ID in ids
    assert (ids[-4], ids[-2]) == (THINK_ID, END_THINK_ID) and ids[-3] == ids[-1]  # one "\n\n"


def test_tied_student_untied_bigger_teacher_with_qk_norms(assets):
    (student, teacher, _), _ = assets
    s, t = _tensors(student), _tensors(teacher)
    cfg_s, cfg_t = AutoConfig.from_pretrained(student), AutoConfig.from_pretrained(teacher)
    assert cfg_s.tie_word_embeddings and not cfg_t.tie_word_embeddings
    assert "lm_head.weight" not in s and t["lm_head.weight"][0] == [151936, cfg_t.hidden_size]
    assert s["model.embed_tokens.weight"][0] == [151936, cfg_s.hidden_size]
    assert (cfg_s.num_hidden_layers, cfg_s.hidden_size) == (2, 64)
    assert cfg_t.num_hidden_layers > 2 and cfg_t.hidden_size > 64
    for tensors, cfg in ((s, cfg_s), (t, cfg_t)):
        for layer in range(cfg.num_hidden_layers):
            for norm in ("q_norm", "k_norm"):
                assert tensors[f"model.layers.{layer}.self_attn.{norm}.weight"][0] == [cfg.head_dim]
        assert {dtype for _, dtype in tensors.values()} == {"BF16"}


def test_sync_buckets_are_smaller_than_one_student_layer(assets):
    (student, teacher, prompts), _ = assets
    cfg = _config(student, teacher, prompts)
    layer_bytes = sum(
        2 * torch.Size(shape).numel()  # bf16
        for name, (shape, _) in _tensors(student).items()
        if name.startswith("model.layers.0.")
    )
    embedding_bytes = 2 * 151936 * 64
    assert cfg.model.dtype == "bfloat16" and cfg.sync.transport == "collective"
    assert cfg.sync.bucket_bytes < layer_bytes < embedding_bytes
    assert cfg.learner.zero_stage == 3 and cfg.learner.gradient_checkpointing
    seqs = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    assert seqs // cfg.learner.mini_batch_size == 4  # 4 optimizer updates per step, as the paper
    per_rank = cfg.learner.mini_batch_size // cfg.learner.num_workers
    assert per_rank // cfg.learner.micro_batch_size == 2  # 2 micro-batches per rank per update
    assert (cfg.teacher.student_eos_token_id, cfg.teacher.teacher_eos_token_id) == (
        ENDOFTEXT_ID,
        IM_END_ID,
    )


def test_config_paths_point_at_the_default_asset_root():
    cfg = load_config(CONFIG)
    root = Path("runs/rehearsal/assets")
    assert Path(cfg.model.student_path) == root / "student"
    assert Path(cfg.model.teacher_path) == root / "teacher"
    assert Path(cfg.data.train_path) == root / "math_train.parquet"
    assert cfg.run.output_dir == "runs/rehearsal" and cfg.run.resume == "never"


def test_prompts_load_and_pass_the_start_up_checks(assets):
    from eopd_ray.core.prompts import load_prompt_texts, render_prompt, tokenize_prompts
    from eopd_ray.roles.teacher import check_model_pair

    (student, teacher, prompts), _ = assets
    cfg = _config(student, teacher, prompts)
    check_model_pair(cfg)
    texts = load_prompt_texts(cfg.data)
    assert len(texts) == 64 and all(t.endswith("\\boxed{}.") for t in texts)
    kept, skipped = tokenize_prompts(cfg)
    assert len(kept) == 64 and skipped == 0
    tok_t = AutoTokenizer.from_pretrained(teacher)
    longest = max(len(render_prompt(t, "chat_no_think", tok_t)) for t in texts)
    assert longest <= cfg.data.max_prompt_tokens
    assert longest + cfg.rollout.max_new_tokens <= cfg.rollout.max_model_len
    import pyarrow.parquet as pq

    assert pq.read_table(prompts).column_names == ["problem", "answer"]


def test_student_sometimes_stops_at_eos_and_sometimes_reaches_the_cap(assets):
    """The shaped LM, in bf16 as the run loads it: almost no mass on fillers and padding rows,
    a moderate EOS share; 16 samples of rollout.max_new_tokens end both ways."""
    from eopd_ray.core.prompts import load_prompt_texts

    (student, teacher, prompts), _ = assets
    cfg = _config(student, teacher, prompts)
    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16).eval()
    live = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    live[[i for t, i in tok.get_vocab().items() if i < ENDOFTEXT_ID and "reserved" not in t]] = True
    live[ENDOFTEXT_ID] = True
    prompt = tok(load_prompt_texts(cfg.data)[0], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt] * 16)
    gen = torch.Generator().manual_seed(0)
    finished = torch.zeros(16, dtype=torch.bool)
    live_mass, eos_prob = [], []
    with torch.no_grad():
        for _ in range(cfg.rollout.max_new_tokens):
            probs = torch.softmax(model(ids).logits[:, -1].float(), -1)
            live_mass.append(float(probs[:, live].sum(-1).min()))
            eos_prob.append(float(probs[:, ENDOFTEXT_ID].mean()))
            token = torch.multinomial(probs, 1, generator=gen)[:, 0]
            finished |= token == ENDOFTEXT_ID
            ids = torch.cat([ids, token[:, None]], 1)
    stopped = int(finished.sum())
    assert 0 < stopped < 16, f"{stopped} of 16 responses stopped at EOS"
    assert min(live_mass) > 0.99
    assert 0.01 < sum(eos_prob) / len(eos_prob) < 0.1
