"""The real-model task's measurements and report: short-answer accuracy, stopping, closeness to
the teacher, before and after distillation (`make run-real`, docs/real-model.md).

    answered = Answered(texts, stopped, lengths)          # one model's samples, per question
    metrics = answer_metrics(questions, answered, k)       # avg@k, pass@k, eos_rate, length
    metrics |= closeness(teacher, model, prompts, teacher_answers, sampled, tau)  # KL, teacher NLL
    table = comparison_table({"teacher": t, "student before": b, "student after": a})

Closeness to the teacher is measured two ways, each a mean over response tokens:
- `kl/teacher_answers`: KL(teacher || model) over the full vocabulary at every position of the
  teacher's own greedy answers to the held-out questions (the forward KL a distillation should
  shrink; identical inputs for every model, so models compare directly), and
  `kl/teacher_answers_uncertain` the same over the positions where the teacher's entropy is at
  least tau (the tokens EOPD's forward-KL term is about);
- `teacher/nll_of_samples`: -log pi_teacher of the model's own sampled tokens (what the teacher
  thinks of what the model says: the reverse-KL direction, on the model's own trajectories).

Imports torch (the closeness measures) but neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eopd_ray.evaluation.short_answer import ShortAnswer, is_correct, judge_completions


@dataclass(frozen=True)
class Answered:
    """One model's responses to a list of questions: per question, per sample."""

    texts: list[list[str]]
    stopped: list[list[bool]]  # ended with the end-of-sequence token (not the length cap)
    lengths: list[list[int]]  # response tokens
    response_ids: list[list[list[int]]] | None = None  # token ids, for the teacher's NLL


def answer_metrics(
    questions: Sequence[ShortAnswer], answered: Answered, k: int
) -> dict[str, float]:
    """The held-out evaluation's metrics (the same keys as during training): `eval/avg@k`,
    `eval/pass@1`, `eval/pass@k`, per-family `eval/<family>/avg@k`, `eval/eos_rate`,
    `eval/response_len_mean`."""
    out = judge_completions(questions, answered.texts, k)
    flat_stop = [s for row in answered.stopped for s in row]
    flat_len = [n for row in answered.lengths for n in row]
    out["eval/eos_rate"] = sum(flat_stop) / len(flat_stop)
    out["eval/response_len_mean"] = sum(flat_len) / len(flat_len)
    return out


def greedy_accuracy(questions: Sequence[ShortAnswer], texts: Sequence[str]) -> float:
    """Fraction of questions whose (one, greedy) answer is correct."""
    return sum(is_correct(q, t) for q, t in zip(questions, texts, strict=True)) / len(questions)


def _response_logprobs(model: Any, prompt: list[int], responses: list[list[int]]) -> list:
    """fp32 log-softmax over the vocabulary at the positions predicting each response's tokens:
    one (T_j, V) tensor per response. One forward for all of them, right-padded (causal
    attention: no real token sees the padding after it)."""
    import torch

    rows = [prompt + r for r in responses]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # (N, L)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    # The LM head only where a response token is predicted: the rows share the prompt, so
    # those are the last L - (P - 1) positions of every row (most of a short answer's
    # sequence is prompt).
    keep = ids.shape[1] - len(prompt) + 1
    logits = model(ids, logits_to_keep=keep).logits  # (N, keep, V)
    return [
        torch.log_softmax(logits[i, : len(r)].float(), -1)  # (T_j, V)
        for i, r in enumerate(responses)
    ]


def closeness(
    teacher: Any,
    model: Any,
    prompts: Sequence[list[int]],
    teacher_answers: Sequence[list[int]],
    samples: Sequence[Sequence[list[int]]],
    tau: float,
) -> dict[str, float]:
    """`kl/teacher_answers`, `kl/teacher_answers_uncertain` (teacher entropy >= tau) and
    `teacher/nll_of_samples` (see the module docstring) of `model` against `teacher`, both
    transformers causal LMs over the same vocabulary; `teacher_answers[i]` and `samples[i][j]`
    are response ids to `prompts[i]` (EOS included when generated). Token means; one teacher
    forward per prompt (its answer and the samples together), one model forward."""
    import torch

    kl_sum = kl_n = kl_unc_sum = kl_unc_n = nll_sum = nll_n = 0.0
    with torch.no_grad():
        for prompt, answer, sampled in zip(prompts, teacher_answers, samples, strict=True):
            responses = [r for r in [answer, *sampled] if r]
            if not responses:
                continue
            scored = _response_logprobs(teacher, prompt, responses)
            if answer:
                t_logp = scored.pop(0)  # (T, V)
                m_logp = _response_logprobs(model, prompt, [answer])[0]
                t_p = t_logp.exp()
                kl = (t_p * (t_logp - m_logp)).sum(-1)  # (T,)
                uncertain = -(t_p * t_logp).sum(-1) >= tau  # teacher entropy, (T,)
                kl_sum += float(kl.sum())
                kl_n += kl.numel()
                kl_unc_sum += float(kl[uncertain].sum())
                kl_unc_n += int(uncertain.sum())
            for t_logp, response in zip(scored, [r for r in sampled if r], strict=True):
                picked = t_logp.gather(-1, torch.tensor(response)[:, None])[:, 0]  # (T,)
                nll_sum -= float(picked.sum())
                nll_n += len(response)
    nan = float("nan")
    return {
        "kl/teacher_answers": kl_sum / kl_n if kl_n else nan,
        "kl/teacher_answers_uncertain": kl_unc_sum / kl_unc_n if kl_unc_n else nan,
        "kl/teacher_uncertain_frac": kl_unc_n / kl_n if kl_n else nan,
        "teacher/nll_of_samples": nll_sum / nll_n if nll_n else nan,
    }


# ----------------------------------------------------------------------------------- report

# (key, label, format) in table order; k is filled in.
TABLE_ROWS = (
    ("eval/avg@{k}", "accuracy of a sample (Avg@{k}, temperature 1)", "{:.3f}"),
    ("eval/pass@{k}", "Pass@{k}", "{:.3f}"),
    ("greedy/accuracy", "accuracy of the greedy answer", "{:.3f}"),
    ("eval/eos_rate", "samples that stop by themselves (EOS rate)", "{:.3f}"),
    ("eval/response_len_mean", "response length (tokens, cap {cap})", "{:.1f}"),
    ("kl/teacher_answers", "KL(teacher ‖ model) per token, on the teacher's answers", "{:.3f}"),
    ("kl/teacher_answers_uncertain", "the same, on teacher-uncertain tokens (H ≥ tau)", "{:.3f}"),
    ("teacher/nll_of_samples", "teacher's NLL of the model's own samples, per token", "{:.3f}"),
)


def comparison_table(columns: dict[str, dict[str, float]], k: int, cap: int) -> str:
    """A markdown table: one row per metric, one column per model ("-" when absent), then one
    row per question family (its Avg@k)."""
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, fmt in TABLE_ROWS:
        key = key.format(k=k)
        cells = [fmt.format(columns[n][key]) if key in columns[n] else "-" for n in names]
        lines.append(f"| {label.format(k=k, cap=cap)} | " + " | ".join(cells) + " |")
    suffix = f"/avg@{k}"
    families = sorted(
        {
            key.removeprefix("eval/").removesuffix(suffix)
            for c in columns.values()
            for key in c
            if key.endswith(suffix) and key.count("/") == 2
        }
    )
    for family in families:
        key = f"eval/{family}{suffix}"
        cells = [f"{columns[n][key]:.3f}" if key in columns[n] else "-" for n in names]
        lines.append(f"| Avg@{k}, {family} questions | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(questions: Sequence[ShortAnswer], count: int) -> list[int]:
    """Indices of `count` questions taken round-robin over the families (the first question of
    each family, then the second, ...), in the families' order of appearance."""
    families: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        families.setdefault(q.family, []).append(i)
    order = [
        column[r]
        for r in range(max(map(len, families.values()), default=0))
        for column in families.values()
        if r < len(column)
    ]
    return order[:count]


def samples_section(
    questions: Sequence[ShortAnswer], answers: dict[str, Sequence[str]], count: int
) -> list[str]:
    """Markdown: `count` questions spread over the families (`spread`), each with every
    model's greedy answer, judged."""
    lines = []
    for i in spread(questions, count):
        q = questions[i]
        lines += [f"**{q.prompt}** (accepted: {', '.join(q.answers)})", ""]
        for name, texts in answers.items():
            text = " ".join(texts[i].split()) or "(empty)"
            mark = "✓" if is_correct(q, texts[i]) else "✗"
            lines.append(f"- {name}: {mark} {text}")
        lines.append("")
    return lines


def _mean(rows: Sequence[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else float("nan")


def step_breakdown(rows: Sequence[dict]) -> list[str]:
    """Markdown: where a step's time goes (means over the steps after the first): the critical
    path (`time/*`), each role's busy time (`roles/*`), the weight sync by part (`sync/*_s`),
    and the sync's share of the step."""
    steady = [r for r in rows[1:] if "time/step_s" in r] or list(rows)
    keys = sorted({k for r in steady for k in r})
    step_s = _mean(steady, "time/step_s")
    lines = [f"Means over {len(steady)} steps (the first, which warms up, left out).", ""]
    lines += ["| metric | seconds | share of the step |", "|---|---:|---:|"]
    for prefix in ("time/", "roles/", "sync/"):
        for key in keys:
            if key.startswith(prefix) and key.endswith("_s") and key != "time/eval_s":
                value = _mean(steady, key)
                lines.append(f"| `{key}` | {value:.2f} | {value / step_s:.1%} |")
    return lines


def _evaluation_section(rows: Sequence[dict], k: int) -> list[str]:
    evaluated = [r for r in rows if f"eval/avg@{k}" in r]
    if not evaluated:
        return []
    keys = [f"eval/avg@{k}", f"eval/pass@{k}", "eval/eos_rate", "eval/response_len_mean"]
    lines = [
        "| steps done | " + " | ".join(key.removeprefix("eval/") for key in keys) + " |",
        "|---:|" + "---:|" * len(keys),
    ]
    for r in evaluated:
        cells = [f"{r[key]:.3f}" if key in r else "-" for key in keys]
        lines.append(f"| {r['step'] + 1} | " + " | ".join(cells) + " |")
    return lines


def write_report(
    run_dir: Path,
    *,
    command: str,
    table: str,
    samples: list[str],
    rows: Sequence[dict],
    task: dict,
    k: int,
    plots: Sequence[Path] = (),
) -> Path:
    """<run_dir>/report.md: samples first (people read them before tables), the before/after
    table, the task, the held-out curve during training, where a step's time goes."""
    head, tail = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10) :]
    counts = ", ".join(f"{f} {n}" for f, n in sorted(task.get("held_out_by_family", {}).items()))
    lines = [
        "# Real-model run report",
        "",
        f"Command: `{command}`",
        "",
        f"Teacher `{task.get('teacher', '?')}`, student `{task.get('student', '?')}`. Task: "
        f"{task.get('bank', '?')} questions written in eopd_ray/evaluation/question_bank.py, of "
        f"which the teacher answered {task.get('kept', '?')} correctly (greedy); "
        f"{task.get('train', '?')} of those train, {task.get('held_out', '?')} are held out "
        f"(facts never asked in training: {counts}).",
        "",
        "## Held-out questions: greedy answers before and after",
        "",
        *samples,
        f"## Held-out questions ({task.get('held_out', '?')}, {k} samples each at temperature 1)",
        "",
        table,
        "",
        "## Training",
        "",
        f"- steps: {len(rows)}, mean step time after the first: "
        f"{_mean(rows[1:] or rows, 'time/step_s'):.2f} s",
        "- reverse KL (sampled, mean of the first / last 10% of steps): "
        f"{_mean(head, 'kl/reverse_sampled'):.3f} -> {_mean(tail, 'kl/reverse_sampled'):.3f}",
        "- rollouts that hit the length cap: "
        f"{_mean(head, 'rollout/finish_length_frac'):.3f} -> "
        f"{_mean(tail, 'rollout/finish_length_frac'):.3f}",
        f"- fraction of tokens gated to forward KL: {_mean(rows, 'gate/frac'):.3f}",
        "",
        "Held-out evaluation during training (eval.every_steps, on the rollout worker):",
        "",
        *_evaluation_section(rows, k),
        "",
        "## Where a step goes",
        "",
        *step_breakdown(rows),
        "",
        *[f"![{p.stem}]({os.path.relpath(p, run_dir)})" for p in plots],
        "",
    ]
    path = run_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
