"""The paper recipe rehearsed on CPU (jobs/configs/rehearsal.yaml): Qwen3 shapes with 151,936
embedding rows, tied student / untied teacher, bf16, 2 rollout workers, ZeRO-3 with 2
micro-batches per rank, 4 updates per step, sync buckets smaller than one decoder layer,
variable-length responses, the 151643 -> 151645 EOS mapping, prompts from parquet."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from eopd_ray.config import load_config
from eopd_ray.core.invariants import sampler_gap_bound
from eopd_ray.driver.pipeline import Pipeline
from eopd_ray.telemetry.timeline import Timeline
from eopd_ray.toy.rehearsal import ensure_rehearsal_for_config

from .conftest import REPO, sync_step_data

pytestmark = pytest.mark.slow

REHEARSAL = REPO / "jobs" / "configs" / "rehearsal.yaml"
STUDENT_EOS, TEACHER_EOS = 151643, 151645


def _teacher_reference(cfg, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """Log-probs (T, V) of the teacher over the student's response, computed here from scratch:
    the teacher's chat rendering of the prompt, EOS mapped, fp32 LM head, float64 softmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eopd_ray.core.prompts import render_prompt

    student_tok = AutoTokenizer.from_pretrained(cfg.model.student_path)
    teacher_tok = AutoTokenizer.from_pretrained(cfg.model.teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(
        cfg.model.teacher_path, dtype=torch.bfloat16
    ).eval()
    prompt = render_prompt(student_tok.decode(prompt_ids), cfg.data.teacher_template, teacher_tok)
    mapped = [TEACHER_EOS if t == STUDENT_EOS else t for t in response_ids]
    with torch.no_grad():
        hidden = teacher.model(torch.tensor([prompt + mapped])).last_hidden_state[0]
        hidden = hidden[len(prompt) - 1 : -1].double()  # (T, H): predicts each response token
        logits = hidden @ teacher.lm_head.weight.double().T
    return torch.log_softmax(logits, -1)


_VLLM_LOADS_EXPORT = r"""
import json, sys
from eopd_ray.config import config_from_dict
from eopd_ray.roles.rollout_engines import HfEngine, VllmEngine
path, ids = sys.argv[1], json.loads(sys.argv[2])
cfg = config_from_dict({
    "model": {"student_path": path, "teacher_path": path, "dtype": "bfloat16"},
    "data": {"toy_prompts": 4, "max_prompt_tokens": 64},
    "rollout": {"max_model_len": 128, "max_new_tokens": 8, "kv_cache_bytes": 16 * 2**20},
})
a = VllmEngine(cfg, seed=0).token_logprobs(ids)
b = HfEngine(cfg, seed=0).token_logprobs(ids)
print(json.dumps({"gap": sum(abs(x - y) for x, y in zip(a, b)) / len(a)}))
"""


def _held_out_benchmarks(tmp_path) -> list[str]:
    """Two benchmark files of problems the rehearsal never trains on (another seed)."""
    from eopd_ray.toy.rehearsal_text import rehearsal_problems

    problems = rehearsal_problems(16, seed=1)
    paths = []
    for name, chunk in (("sums", problems[:8]), ("words", problems[8:])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": i, **p}) + "\n" for i, p in enumerate(chunk)))
        paths.append(str(path))
    return paths


def test_rehearsal_runs_the_paper_code_paths(local_ray, tmp_path):
    root = tmp_path / "assets"
    out = tmp_path / "run"
    cfg = load_config(
        REHEARSAL,
        [
            f"model.student_path={root / 'student'}",
            f"model.teacher_path={root / 'teacher'}",
            f"data.train_path={root / 'math_train.parquet'}",
            f"run.output_dir={out}",
            "run.steps=2",  # two syncs checked; jobs/configs/rehearsal.yaml itself runs 3 steps
            # Held-out math during training: two benchmark files, judged by equivalence.
            "eval.every_steps=2",
            f"eval.benchmarks={json.dumps(_held_out_benchmarks(tmp_path))}",
            "eval.max_problems=4",
            "eval.samples_per_problem=2",
            "eval.k=2",
        ],
    )
    ensure_rehearsal_for_config(cfg)
    # The resolved config takes the paper's paths, not the toy's.
    lrn = cfg.learner
    assert cfg.model.dtype == "bfloat16" and lrn.zero_stage == 3
    assert cfg.rollout.num_workers >= 2 and lrn.num_workers == 2
    assert lrn.micro_batch_size < lrn.mini_batch_size // lrn.num_workers
    assert cfg.rollout.prompts_per_step // lrn.mini_batch_size == 4

    pipeline = Pipeline(cfg)
    try:
        pipeline.start()
        history = pipeline.run(progress="lines")
        # One more rollout with the final weights, scored by the teacher, to inspect.
        step = cfg.run.steps
        before = pipeline.state.stream.state_dict()
        batch, scores, old = sync_step_data(pipeline, step)
        # The same step streamed (the mode the run trained in): the same prompts again.
        pipeline.state.stream.load_state_dict(before)
        timeline = Timeline(step, "streamed")
        _, stream = pipeline.rollouts.step_stream(step, timeline, prefetch=False)
        streamed = stream.run()
        buckets = pipeline.learner.get(
            pipeline.learner.call_async("weight_buckets"), 300, "learner weights"
        )[0]
    finally:
        pipeline.shutdown()

    assert len(history) == cfg.run.steps
    # Streamed, the step holds the same rows in the same order (the same samples: each worker
    # ran the same requests), and teacher scores and pi_old agree up to the bf16 forwards'
    # summation order (per group here, per whole batch there).
    assert all(h["stream/groups"] >= cfg.rollout.num_workers for h in history)
    assert streamed.metrics["stream/groups"] > cfg.rollout.num_workers
    for field in ("prompt_ids", "response_ids", "response_mask", "sampler_logprobs"):
        assert torch.equal(getattr(streamed.batch, field), getattr(batch, field)), field
    assert streamed.batch.finish_reason == batch.finish_reason
    # Ten times the bf16 noise measured on these toy models (2-3e-3): tighter than the run-time
    # default (sampler_gap_bound, 0.25 for bf16: real models' larger logits round more).
    bound = 3e-2
    assert bound < sampler_gap_bound(cfg)
    valid = batch.response_mask
    for field in ("token_logprobs", "entropy", "topk_logprobs"):
        gap = (getattr(streamed.scores, field) - getattr(scores, field))[valid].abs().mean()
        assert gap < bound, (field, float(gap))
    assert (streamed.old - old)[valid].abs().mean() < bound
    # Evaluated once, after the last step, on 4 problems of each benchmark, 2 samples each.
    assert [i for i, h in enumerate(history) if "eval/avg@2" in h] == [1]
    evaluation = {k: v for k, v in history[-1].items() if k.startswith("eval/")}
    assert {"eval/sums/avg@2", "eval/words/pass@2", "eval/pass@2"} <= set(evaluation)
    assert all(0 <= v <= 1 for k, v in evaluation.items() if "@" in k)
    assert 0 < evaluation["eval/response_len_mean"] <= cfg.eval.max_new_tokens
    gaps = [h["opd/sampler_gap"] for h in history]
    assert all(math.isfinite(g) and g <= bound for g in gaps), gaps
    # Variable lengths: some responses stop at EOS, some reach rollout.max_new_tokens.
    finishes = {r for h in [batch] for r in h.finish_reason}
    length_fracs = [h["rollout/finish_length_frac"] for h in history]
    assert finishes == {"stop", "length"} or any(0 < f < 1 for f in length_fracs), length_fracs

    # The teacher scored the mapped EOS: at a response's final <|endoftext|>, its log-prob is
    # that of <|im_end|> (merged with <|endoftext|> by logsumexp), and the top-K never holds
    # the teacher's own id.
    valid = batch.response_mask
    assert not (scores.topk_ids[valid] == TEACHER_EOS).any()
    stopped = [i for i, r in enumerate(batch.finish_reason) if r == "stop"]
    assert stopped, "no response stopped at EOS"
    row = stopped[0]
    n = int(valid[row].sum())
    response = batch.response_ids[row, :n].tolist()
    assert response[-1] == STUDENT_EOS
    prompt = batch.prompt_ids[row][batch.prompt_mask[row]].tolist()
    reference = _teacher_reference(cfg, prompt, response)  # (T, V)
    merged = torch.logaddexp(reference[-1, TEACHER_EOS], reference[-1, STUDENT_EOS])
    scored = float(scores.token_logprobs[row, n - 1])
    # bf16 backbones (batched and padded there, alone here) differ by a few 1e-2: the dtype's
    # bound. The unmapped id would be ~40 nats off.
    assert abs(scored - float(merged)) < bound, (scored, float(merged))
    assert scored > float(reference[-1, STUDENT_EOS]) + 5  # not the unmapped id's log-prob
    entropy = -(reference.exp() * reference).sum(-1)
    assert torch.allclose(scores.entropy[row, :n].double(), entropy, atol=bound)

    # The HF export holds exactly the learner's parameters and loads in vLLM.
    from safetensors.torch import load_file

    exported = {}
    for shard in sorted((out / "hf").glob("*.safetensors")):
        exported.update(load_file(shard))
    learner = {name: t for bucket in buckets for name, t in bucket}
    assert exported.keys() == learner.keys()
    assert all(torch.equal(exported[k], learner[k]) for k in learner)
    probe = prompt + response
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_LOADS_EXPORT, str(out / "hf"), json.dumps(probe)],
        env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["gap"] < bound
