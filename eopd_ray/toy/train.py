"""Supervised training of a toy model on the task's generator (teacher training, student warm-up).

    losses = train_supervised(model_dir, task, prompts, steps=1500, batch_size=64, lr=3e-3)

Every batch is fresh: `batch_size` prompts drawn at random from `prompts`, each with one answer
sampled by the task's generator (`task.sample_answer_for`: a uniformly random shortest path, or
the codewords in a uniformly random order), so the model learns the full distribution over
correct answers, not one answer per prompt. Cross-entropy on the answer tokens and the closing
EOS only. AdamW with linear warm-up and cosine decay. The model is saved back into `model_dir`
atomically (written beside it, then renamed over it). Works for any toy task (task.ToyTask).
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eopd_ray.toy.task import ToyTask

IGNORE = -100  # label of positions that do not count (prompt, padding)


def encode_example(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one prompt + answer + EOS; the prompt's labels are IGNORE."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def collate(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, each (B, L)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lr_at(update: int, steps: int, lr: float, warmup: int) -> float:
    if update < warmup:
        return lr * (update + 1) / warmup
    progress = (update - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_supervised(
    model_dir: str | Path,
    task: ToyTask,
    prompts: Sequence[str],
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup: int = 50,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the model in `model_dir` for `steps` updates; returns the loss of every update."""
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    prompts = list(prompts)
    losses = []
    for update in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(update, steps, lr, warmup)
        chosen = [rng.choice(prompts) for _ in range(batch_size)]
        batch = collate(
            [encode_example(tokenizer, p, task.sample_answer_for(p, rng)) for p in chosen],
            tokenizer.eos_token_id,
        )
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(update, losses[-1])
    _save_atomically(model, tokenizer, model_dir)
    return losses


def _save_atomically(model, tokenizer, model_dir: Path) -> None:
    staging = model_dir.with_name(model_dir.name + ".saving")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    old = model_dir.with_name(model_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    model_dir.rename(old)
    staging.rename(model_dir)
    shutil.rmtree(old)
