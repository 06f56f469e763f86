"""Held-out sets for evaluation during training: sources, judging, metrics, config rules."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from eopd_ray.config import load_config
from eopd_ray.core.prompts import toy_prompts
from eopd_ray.driver.held_out import (
    HeldOutError,
    accuracy_metrics,
    arithmetic_held_out,
    arithmetic_is_correct,
    load_held_out,
    summary_line,
)
from eopd_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"


def tiny_cfg(tiny_pair, *extra: str):
    student, teacher = tiny_pair
    return load_config(
        TINY,
        [f"model.student_path={student}", f"model.teacher_path={teacher}", *extra],
    )


def brute_pass_at_k(verdicts: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the samples holding at least one correct one (float64)."""
    subsets = list(itertools.combinations(verdicts, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_accuracy_metrics_match_brute_force_on_random_verdicts():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        verdicts = [
            [rng.random() < rng.random() for _ in range(n)] for _ in range(rng.randint(1, 6))
        ]
        out = accuracy_metrics(verdicts, k)
        assert out[f"eval/avg@{k}"] == pytest.approx(
            sum(sum(v) / n for v in verdicts) / len(verdicts), abs=1e-12
        )
        for kk in (1, k):
            expected = sum(brute_pass_at_k(v, kk) for v in verdicts) / len(verdicts)
            assert out[f"eval/pass@{kk}"] == pytest.approx(expected, abs=1e-12)


def test_arithmetic_slice_is_held_out_and_fixed():
    train = toy_prompts(256, 0)
    held = arithmetic_held_out(256, 32, 0)
    assert len(held) == 32 == len(set(held))
    assert not set(held) & set(train)
    assert held == arithmetic_held_out(256, 32, 0)
    assert toy_prompts(256 + 64, 0)[:256] == train  # the training prompts stay the same


def test_arithmetic_checker_reads_the_first_integer():
    prompt = "question: what is 12 + 30? answer:"
    assert arithmetic_is_correct(prompt, " 42.")
    assert arithmetic_is_correct(prompt, "42 because 12 + 30 = 42")
    assert not arithmetic_is_correct(prompt, " 41")
    assert not arithmetic_is_correct(prompt, " forty-two")
    assert not arithmetic_is_correct(prompt, " 12 + 30 = 42")  # the first integer is the answer
    assert not arithmetic_is_correct("not a question", "42")


def test_tiny_arithmetic_held_out_is_rendered_and_judged(tiny_pair):
    cfg = tiny_cfg(tiny_pair, "eval.every_steps=2")
    held = load_held_out(cfg)
    assert held.source == "arithmetic" and len(held.prompts) == cfg.eval.arithmetic_prompts
    assert all(len(ids) <= cfg.data.max_prompt_tokens for ids in held.prompts)
    assert held.decode(held.prompts[0]).startswith("question: what is")
    texts = arithmetic_held_out(cfg.data.toy_prompts, cfg.eval.arithmetic_prompts, cfg.data.seed)
    right = [str(sum(map(int, t.split("what is ")[1].split("?")[0].split(" + ")))) for t in texts]
    # Sample 0 right, the other three wrong: avg 1/4, pass@4 1, pass@1 1/4.
    out = held.judge([[f" {r}", " x", " -1", ""] for r in right])
    assert out == {"eval/avg@4": 0.25, "eval/pass@1": 0.25, "eval/pass@4": 1.0}
    assert load_held_out(tiny_cfg(tiny_pair)) is None  # eval.every_steps 0: nothing loaded


def test_benchmarks_are_capped_judged_per_benchmark_and_averaged(tiny_pair, tmp_path):
    files = []
    for name, answers in (("alpha", ["1/2", "3", "7"]), ("beta", ["10"])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(
            "".join(
                json.dumps({"id": i, "problem": f"what is {a}?", "answer": a}) + "\n"
                for i, a in enumerate(answers)
            )
        )
        files.append(str(path))
    cfg = tiny_cfg(
        tiny_pair,
        "eval.every_steps=1",
        f"eval.benchmarks={json.dumps(files)}",
        "eval.max_problems=2",
        "eval.prompt_suffix=",
    )
    held = load_held_out(cfg)
    assert held.source == "benchmarks" and len(held.prompts) == 3  # 2 of alpha, 1 of beta
    completions = [
        [r"\boxed{0.5}", "no", "no", "no"],  # alpha 0: 1 of 4 (0.5 = 1/2)
        [r"\boxed{3}"] * 4,  # alpha 1: 4 of 4
        [r"\boxed{11}"] * 4,  # beta 0: 0 of 4
    ]
    out = held.judge(completions)
    assert out["eval/alpha/avg@4"] == pytest.approx(0.625)
    assert out["eval/alpha/pass@4"] == pytest.approx(1.0)
    assert out["eval/beta/avg@4"] == 0.0
    assert out["eval/avg@4"] == pytest.approx(0.3125)  # the unweighted mean of the benchmarks
    assert out["eval/pass@4"] == pytest.approx(0.5)


def test_no_held_out_source_is_a_clear_error(tiny_pair, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(64)))
    cfg = tiny_cfg(
        tiny_pair, "eval.every_steps=2", "data.toy_prompts=0", f"data.train_path={prompts}"
    )
    with pytest.raises(HeldOutError, match=r"eval\.benchmarks"):
        load_held_out(cfg)
    with pytest.raises(HeldOutError, match="prepare_toy"):
        load_held_out(tiny_cfg(tiny_pair, "eval.every_steps=2", "eval.source=toy"))


def test_eval_keys_are_validated_with_the_config(tiny_pair):
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens") as err:
        tiny_cfg(tiny_pair, "eval.every_steps=2", "eval.max_new_tokens=8192")
    assert "rollout.max_model_len" in str(err.value)
    with pytest.raises(ConfigError, match=r"eval\.every_steps"):
        tiny_cfg(tiny_pair, "eval.every_steps=-1")
    with pytest.raises(ConfigError, match=r"eval\.benchmarks"):
        tiny_cfg(tiny_pair, "eval.every_steps=2", "eval.source=benchmarks")
    with pytest.raises(ConfigError, match=r"data\.toy_prompts"):
        tiny_cfg(
            tiny_pair,
            "eval.every_steps=2",
            "eval.source=arithmetic",
            "data.toy_prompts=0",
            "data.train_path=x.jsonl",
        )
    # Off, the generation limit of jobs/evaluate.py may exceed the rollout engines'.
    assert tiny_cfg(tiny_pair, "eval.max_new_tokens=8192").eval.every_steps == 0


@pytest.mark.parametrize("kind", ["graph", "chain"])
def test_toy_held_out_is_the_prepared_eval_file_judged_by_the_task(tmp_path, kind):
    import dataclasses

    from eopd_ray.toy.chain import ChainTask
    from eopd_ray.toy.models import TinyModelSpec
    from eopd_ray.toy.prepare import default_settings, prepare_toy, read_prompts

    small = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1)
    settings = dataclasses.replace(
        default_settings(kind), teacher=small, student=small, teacher_steps=2, student_steps=2
    )
    if kind == "chain":
        settings = dataclasses.replace(settings, task=ChainTask(num_prompts=40))
    prepared = prepare_toy(tmp_path, settings, log=lambda _: None)
    cfg = load_config(
        REPO / "jobs" / "configs" / ("toy.yaml" if kind == "graph" else "toy_chain.yaml"),
        [
            "model.build_toy=false",
            f"model.student_path={prepared / 'student'}",
            f"model.teacher_path={prepared / 'teacher'}",
            f"data.train_path={prepared / 'train.jsonl'}",
            "eval.samples_per_problem=2",
            "eval.k=2",
        ],
    )
    held = load_held_out(cfg)
    texts = read_prompts(prepared / "eval.jsonl")
    assert held.source == "toy" and [held.decode(ids) for ids in held.prompts] == texts
    task, rng = settings.task, random.Random(0)
    # Per prompt: one correct answer and one wrong one.
    completions = [[task.sample_answer_for(t, rng), "?"] for t in texts]
    out = held.judge(completions)
    assert out["eval/avg@2"] == 0.5 and out["eval/pass@1"] == 0.5 and out["eval/pass@2"] == 1.0
    assert out["eval/distinct_correct"] == 1.0
    expected = sum(1 / min(2, task.count_answers(t)) for t in texts) / len(texts)
    assert out["eval/coverage"] == pytest.approx(expected)


def test_requests_share_prompts_over_workers_with_fixed_seeds(tiny_pair):
    cfg = tiny_cfg(tiny_pair, "eval.every_steps=2")
    held = load_held_out(cfg)
    one, three = held.requests(cfg.eval, 1), held.requests(cfg.eval, 3)
    assert len(one) == 1 and len(three) == 3
    # Every prompt once, with the same seed however the prompts are shared out.
    seed_of = {i: s for _, idx, seeds, _ in one for i, s in zip(idx, seeds, strict=True)}
    shared = {i: s for _, idx, seeds, _ in three for i, s in zip(idx, seeds, strict=True)}
    assert seed_of == shared and sorted(shared) == list(range(len(held.prompts)))
    sampling = one[0][3]
    assert (sampling.samples_per_prompt, sampling.max_new_tokens) == (4, 32)
    assert len(held.requests(cfg.eval, 1000)) == len(held.prompts)  # no worker gets nothing
    assert summary_line({"eval/avg@4": 0.25, "eval/x/avg@4": 1.0, "time/eval_s": 2.0}) == (
        "avg@4 0.250"
    )


def test_short_answer_held_out_is_the_question_file_rendered_and_judged(tiny_pair, tmp_path):
    from eopd_ray.evaluation.short_answer import ShortAnswer, write_questions

    path = tmp_path / "eval.jsonl"
    questions = [
        ShortAnswer("what is 2 + 2?", ("4", "four"), ("3", "5"), "sum", "2+2"),
        ShortAnswer("capital of egypt?", ("cairo",), ("paris",), "capital", "egypt"),
    ]
    write_questions(path, questions)
    # auto picks the question file when no benchmarks are set
    cfg = tiny_cfg(tiny_pair, "eval.every_steps=2", f"eval.short_answer_path={path}")
    held = load_held_out(cfg)
    assert held.source == "short_answer"
    assert [held.decode(ids) for ids in held.prompts] == [q.prompt for q in questions]
    out = held.judge([["4", "four", "3 or 4", "x"], ["Cairo.", "Paris", "cairo", "cairo!"]])
    assert out["eval/avg@4"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert out["eval/sum/avg@4"] == 0.5 and out["eval/capital/avg@4"] == 0.75
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q"}\n')
    with pytest.raises(HeldOutError, match=r"eval\.short_answer_path: .*bad\.jsonl, line 1"):
        load_held_out(tiny_cfg(tiny_pair, "eval.every_steps=2", f"eval.short_answer_path={bad}"))
    with pytest.raises(ConfigError, match=r"eval\.short_answer_path"):
        tiny_cfg(tiny_pair, "eval.every_steps=2", "eval.source=short_answer")


def test_score_adds_the_eos_rate_and_the_response_length(tiny_pair, tmp_path):
    import torch

    from eopd_ray.core.wire import RolloutBatch

    cfg = tiny_cfg(tiny_pair, "eval.every_steps=2", "eval.samples_per_problem=2", "eval.k=2")
    held = load_held_out(cfg)
    n = len(held.prompts)
    # Per prompt: a 2-token answer that stopped and a 4-token one cut at the length cap.
    rows = [(p, length) for p in range(n) for length in (2, 4)]
    batch = RolloutBatch(
        prompt_ids=torch.ones(2 * n, 1, dtype=torch.long),
        prompt_mask=torch.ones(2 * n, 1, dtype=torch.bool),
        response_ids=torch.full((2 * n, 4), 5, dtype=torch.long),
        response_mask=torch.tensor([[t < length for t in range(4)] for _, length in rows]),
        sampler_logprobs=torch.zeros(2 * n, 4),
        prompt_index=torch.tensor([p for p, _ in rows]),
        finish_reason=tuple("stop" if length == 2 else "length" for _, length in rows),
        weight_version=0,
    )
    out = held.score(batch)
    assert out["eval/eos_rate"] == 0.5
    assert out["eval/response_len_mean"] == 3.0
