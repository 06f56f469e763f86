"""Evaluation on a toy task (graph or chain): accuracy, diversity and the paper's entropy
diagnostics.

    report = evaluate_toy(student_dir, task, prompts, teacher_dir=teacher_dir, samples=8)
    report["avg@8"], report["pass@8"], report["distinct_correct"], report["student/entropy_mean"]

For every held-out prompt the model samples `samples` answers (temperature 1, full vocabulary:
the distribution the paper's Avg@8 / Pass@8 are measured on), each judged by the task's checker:

- `avg@k`: mean over prompts of the fraction of correct samples (k = samples).
- `pass@k`: unbiased estimate of "at least one of k correct", for k = 1, 2, 4, ..., samples.
- `distinct_correct`: distinct correct answers per prompt, and `distinct_correct_frac`: the same
  over the number of correct answers the prompt has (`task.count_answers`, capped at `samples`)
  — 1.0 is full coverage.
- `student/entropy_mean`, `student/frac_high_entropy`: the model's full-vocabulary entropy (nats)
  on the response tokens of its own samples, and the fraction at or above tau.
- with a teacher: `teacher/entropy_mean`, `teacher/frac_high_entropy` on the same tokens, and
  `fkl/high_entropy`: KL(teacher || model) averaged over the tokens where the teacher's entropy is
  at or above tau — how well the model covers the teacher where the teacher is uncertain.

All entropies and KLs are computed in float64 from the full logits. Uses torch + transformers
only (HF `generate`): the toy models are small, so no engine is needed. Only the common task
interface (task.ToyTask) is used; prompts are sampled in batches of equal length (the chain
task's prompts differ in length), so no padding is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eopd_ray.evaluation.math_answers import pass_at_k
from eopd_ray.toy.task import ToyTask, judge_answers

# Tokens sampled beyond the longest correct answer and its EOS, so that a model that overshoots
# is seen to (and judged wrong) rather than cut at exactly the right length.
ANSWER_SLACK = 5


def pass_ks(samples: int) -> list[int]:
    """1, 2, 4, ... up to `samples` (and `samples` itself)."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return [*ks, samples]


def token_diagnostics(
    model_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    mask: torch.Tensor,
    tau: float,
) -> dict[str, float]:
    """Entropy / FKL statistics over the positions where `mask` is True.

    model_logits, teacher_logits: (N, T, V) next-token logits at the response positions;
    mask: (N, T) bool. Sums, not means, are returned with counts so batches can be merged.
    """
    logp = torch.log_softmax(model_logits.double(), dim=-1)  # (N, T, V)
    entropy = -(logp.exp() * logp).sum(-1)  # (N, T)
    out = {
        "tokens": float(mask.sum()),
        "student_entropy_sum": float(entropy[mask].sum()),
        "student_high": float((entropy[mask] >= tau).sum()),
    }
    if teacher_logits is not None:
        logq = torch.log_softmax(teacher_logits.double(), dim=-1)  # (N, T, V)
        q = logq.exp()
        teacher_entropy = -(q * logq).sum(-1)  # (N, T)
        fkl = (q * (logq - logp)).sum(-1)  # (N, T): KL(teacher || model)
        gate = mask & (teacher_entropy >= tau)
        out |= {
            "teacher_entropy_sum": float(teacher_entropy[mask].sum()),
            "teacher_high": float(gate.sum()),
            "fkl_high_sum": float(fkl[gate].sum()),
        }
    return out


@torch.no_grad()
def _sample(model, tokenizer, prompts: Sequence[str], samples: int, max_new_tokens: int, seed: int):
    """(prompt ids (P, Lp), sequences (P * samples, Lp + T)); `prompts` share one length."""
    encoded = tokenizer(list(prompts), add_special_tokens=False, return_tensors="pt")
    torch.manual_seed(seed)
    sequences = model.generate(
        **encoded,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_return_sequences=samples,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return encoded["input_ids"], sequences


def _response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(N, T) True up to and including the first EOS (generate pads with EOS after it)."""
    is_eos = responses == eos_id
    before_first_eos = torch.cumsum(is_eos.long(), dim=1) - is_eos.long() == 0
    return before_first_eos


def default_max_new_tokens(task: ToyTask) -> int:
    """The longest correct answer + EOS + ANSWER_SLACK (12 for the default graph task, 42 for
    the default chain task)."""
    return task.max_answer_tokens + 1 + ANSWER_SLACK


def _equal_length_chunks(tokenizer, prompts: Sequence[str], size: int):
    """(start, chunk): the prompts grouped by token length (first-seen order), in chunks of at
    most `size`; `start` counts the prompts of the chunks before (it seeds the sampling)."""
    groups: dict[int, list[str]] = {}
    for prompt in prompts:
        length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        groups.setdefault(length, []).append(prompt)
    start = 0
    for group in groups.values():
        for i in range(0, len(group), size):
            yield start, group[i : i + size]
            start += len(group[i : i + size])


@torch.no_grad()
def evaluate_toy(
    model_dir: str | Path,
    task: ToyTask,
    prompts: Sequence[str],
    teacher_dir: str | Path | None = None,
    samples: int = 8,
    tau: float = 0.8,
    max_new_tokens: int | None = None,
    seed: int = 0,
    batch_prompts: int = 64,
) -> dict[str, float]:
    """Accuracy, diversity and entropy diagnostics of the model in `model_dir` (see module doc).

    max_new_tokens: None for default_max_new_tokens(task)."""
    max_new_tokens = max_new_tokens or default_max_new_tokens(task)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    teacher = None
    if teacher_dir is not None:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        teacher.eval()
    eos = tokenizer.eos_token_id
    ks = pass_ks(samples)
    totals: dict[str, float] = {}
    avg, passes, distinct, coverage = [], {k: [] for k in ks}, [], []
    for start, chunk in _equal_length_chunks(tokenizer, prompts, batch_prompts):
        prompt_ids, sequences = _sample(
            model, tokenizer, chunk, samples, max_new_tokens, seed + start
        )
        prompt_len = prompt_ids.shape[1]
        responses = sequences[:, prompt_len:]  # (N, T)
        mask = _response_mask(responses, eos)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        for p, prompt in enumerate(chunk):
            stats = judge_answers(task, prompt, texts[p * samples : (p + 1) * samples])
            num_correct = sum(stats.correct)
            avg.append(num_correct / samples)
            for k in ks:
                passes[k].append(pass_at_k(samples, num_correct, k))
            distinct.append(stats.distinct)
            coverage.append(stats.coverage)
        # Logits predicting each response token: positions prompt_len-1 .. end-1.
        attention = torch.cat([torch.ones_like(sequences[:, :prompt_len]), mask.long()], dim=1)
        model_logits = model(sequences, attention_mask=attention).logits[:, prompt_len - 1 : -1]
        teacher_logits = None
        if teacher is not None:
            teacher_logits = teacher(sequences, attention_mask=attention).logits
            teacher_logits = teacher_logits[:, prompt_len - 1 : -1]
        for key, value in token_diagnostics(model_logits, teacher_logits, mask, tau).items():
            totals[key] = totals.get(key, 0.0) + value
    n = len(avg)
    out = {
        "prompts": float(n),
        f"avg@{samples}": sum(avg) / n,
        "distinct_correct": sum(distinct) / n,
        "distinct_correct_frac": sum(coverage) / n,
        "student/entropy_mean": totals["student_entropy_sum"] / totals["tokens"],
        "student/frac_high_entropy": totals["student_high"] / totals["tokens"],
        "response_tokens_mean": totals["tokens"] / (n * samples),
    }
    out |= {f"pass@{k}": sum(v) / n for k, v in passes.items()}
    if teacher is not None:
        out["teacher/entropy_mean"] = totals["teacher_entropy_sum"] / totals["tokens"]
        out["teacher/frac_high_entropy"] = totals["teacher_high"] / totals["tokens"]
        out["fkl/high_entropy"] = totals["fkl_high_sum"] / max(1.0, totals["teacher_high"])
    return out
