"""The real-model task's measurements and report: metrics, closeness to the teacher against a
float64 brute force, the before/after table and report.md."""

from __future__ import annotations

import math

import pytest
import torch

from eopd_ray.evaluation.real_task import (
    Answered,
    answer_metrics,
    closeness,
    comparison_table,
    greedy_accuracy,
    samples_section,
    spread,
    step_breakdown,
    write_report,
)
from eopd_ray.evaluation.short_answer import ShortAnswer

QUESTIONS = [
    ShortAnswer("Capital of Egypt?", ("Cairo",), ("Paris",), "capital", "Egypt"),
    ShortAnswer("What is 3 + 4?", ("7",), ("8",), "sum", "3+4"),
]


def test_answer_metrics_add_eos_rate_and_length_to_the_judged_ones():
    answered = Answered(
        texts=[["Cairo.", "Paris"], ["7", "8"]],
        stopped=[[True, False], [True, True]],
        lengths=[[3, 32], [1, 1]],
    )
    out = answer_metrics(QUESTIONS, answered, k=2)
    assert out["eval/avg@2"] == 0.5 and out["eval/capital/avg@2"] == 0.5
    assert out["eval/eos_rate"] == 0.75
    assert out["eval/response_len_mean"] == pytest.approx(37 / 4)
    assert greedy_accuracy(QUESTIONS, ["Cairo", "9"]) == 0.5


class LookupLM(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the last token: a (V, V) table."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor, logits_to_keep: int = 0):
        logits = self.table[ids][:, -logits_to_keep:]  # (N, L or logits_to_keep, V)
        return type("Out", (), {"logits": logits})()


def brute_force(teacher_table, model_table, prompt, answer, samples, tau):
    """The module's three measures in float64, position by position."""
    t_all = torch.log_softmax(teacher_table.double(), -1)
    m_all = torch.log_softmax(model_table.double(), -1)
    seq = prompt + answer
    kls, entropies = [], []
    for pos in range(len(prompt) - 1, len(seq) - 1):
        t, m = t_all[seq[pos]], m_all[seq[pos]]
        kls.append(float((t.exp() * (t - m)).sum()))
        entropies.append(float(-(t.exp() * t).sum()))
    nll = []
    for response in samples:
        s = prompt + response
        nll += [-float(t_all[s[p], s[p + 1]]) for p in range(len(prompt) - 1, len(s) - 1)]
    uncertain = [k for k, h in zip(kls, entropies, strict=True) if h >= tau]
    return (
        sum(kls) / len(kls),
        sum(uncertain) / len(uncertain) if uncertain else math.nan,
        sum(nll) / len(nll),
    )


def test_closeness_matches_a_float64_brute_force():
    gen = torch.Generator().manual_seed(0)
    vocab = 7
    teacher_table = torch.randn(vocab, vocab, generator=gen) * 2
    teacher_table[3] *= 0.05  # after token 3 the teacher is uncertain (entropy near ln 7)
    model_table = torch.randn(vocab, vocab, generator=gen)
    teacher, model = LookupLM(teacher_table), LookupLM(model_table)
    prompt, answer, samples = [1, 2], [3, 4, 3, 5], [[6, 3], [0]]
    out = closeness(teacher, model, [prompt], [answer], [samples], tau=1.5)
    kl, kl_uncertain, nll = brute_force(teacher_table, model_table, prompt, answer, samples, 1.5)
    assert out["kl/teacher_answers"] == pytest.approx(kl, rel=1e-5)
    assert out["kl/teacher_answers_uncertain"] == pytest.approx(kl_uncertain, rel=1e-5)
    assert out["kl/teacher_uncertain_frac"] == 0.5  # after tokens 3 and 3, of four positions
    assert out["teacher/nll_of_samples"] == pytest.approx(nll, rel=1e-5)
    same = closeness(teacher, teacher, [prompt], [answer], [samples], tau=1.5)
    assert same["kl/teacher_answers"] == pytest.approx(0.0, abs=1e-6)
    # No response tokens: NaN, not a division by zero.
    empty = closeness(teacher, model, [prompt], [[]], [[[]]], tau=1.5)
    assert all(math.isnan(v) for v in empty.values())


def test_comparison_table_lists_metrics_then_families():
    columns = {
        "teacher": {"eval/avg@4": 1.0, "eval/capital/avg@4": 1.0, "eval/eos_rate": 1.0},
        "student": {"eval/avg@4": 0.25, "eval/sum/avg@4": 0.5},
    }
    table = comparison_table(columns, k=4, cap=32).splitlines()
    assert table[0] == "| metric | teacher | student |"
    assert "| accuracy of a sample (Avg@4, temperature 1) | 1.000 | 0.250 |" in table
    assert "| samples that stop by themselves (EOS rate) | 1.000 | - |" in table
    assert "| response length (tokens, cap 32) | - | - |" in table
    assert table[-2:] == [
        "| Avg@4, capital questions | 1.000 | - |",
        "| Avg@4, sum questions | - | 0.500 |",
    ]


def test_samples_section_marks_each_greedy_answer():
    lines = samples_section(QUESTIONS, {"teacher": ["Cairo.", "7"], "student": ["x\ny", ""]}, 1)
    assert lines == [
        "**Capital of Egypt?** (accepted: Cairo)",
        "",
        "- teacher: ✓ Cairo.",
        "- student: ✗ x y",
        "",
    ]


def test_step_breakdown_gives_shares_of_the_step_without_the_first():
    rows = [
        {"step": 0, "time/step_s": 100.0, "time/sync_s": 50.0},
        {"step": 1, "time/step_s": 10.0, "time/sync_s": 1.0, "sync/probe_s": 0.5},
        {"step": 2, "time/step_s": 30.0, "time/sync_s": 3.0, "roles/learner_busy_s": 12.0},
    ]
    lines = step_breakdown(rows)
    assert lines[0].startswith("Means over 2 steps")
    assert "| `time/sync_s` | 2.00 | 10.0% |" in lines
    assert "| `time/step_s` | 20.00 | 100.0% |" in lines
    assert "| `roles/learner_busy_s` | 12.00 | 60.0% |" in lines
    assert "| `sync/probe_s` | 0.50 | 2.5% |" in lines


def test_write_report_puts_samples_first(tmp_path):
    rows = [
        {"step": s, "time/step_s": 1.0, "kl/reverse_sampled": 3.0 - s, "eval/avg@4": 0.1 * s}
        for s in range(3)
    ]
    task = {"bank": 10, "kept": 6, "train": 4, "held_out": 2, "held_out_by_family": {"sum": 2}}
    path = write_report(
        tmp_path, command="cmd", table="TABLE", samples=["SAMPLES"], rows=rows, task=task, k=4
    )
    text = path.read_text()
    assert text.index("SAMPLES") < text.index("TABLE") < text.index("## Where a step goes")
    assert "of which the teacher answered 6 correctly" in text and "sum 2" in text
    assert "| 3 | 0.200 |" in text  # the held-out curve: steps done, avg@4
    assert "3.000 -> 1.000" in text  # the reverse KL, first and last 10% of the steps


def test_closeness_batched_with_padding_equals_one_sequence_at_a_time(tiny_pair):
    from transformers import AutoModelForCausalLM

    student, teacher = (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for path in tiny_pair
    )
    prompt, answer = [5, 6, 7, 8], [9, 10, 11]
    samples = [[12], [13, 14, 15, 16, 17, 18], [], [19, 20]]  # ragged: padded in one forward
    together = closeness(teacher, student, [prompt], [answer], [samples], tau=0.0)
    alone = [closeness(teacher, student, [prompt], [answer], [[s]], tau=0.0) for s in samples]
    lengths = [len(s) for s in samples]
    nll = sum(a["teacher/nll_of_samples"] * n for a, n in zip(alone, lengths, strict=True) if n)
    assert together["teacher/nll_of_samples"] == pytest.approx(nll / sum(lengths), rel=1e-5)
    assert together["kl/teacher_answers"] == pytest.approx(alone[0]["kl/teacher_answers"])
    assert together["kl/teacher_answers"] > 0


def test_spread_takes_questions_round_robin_over_families():
    qs = [ShortAnswer(f"q{i}?", ("a",), (), family, "") for i, family in enumerate("aaabbc")]
    assert spread(qs, 4) == [0, 3, 5, 1]
    assert spread(qs, 10) == [0, 3, 5, 1, 4, 2]
    assert spread([], 3) == []
