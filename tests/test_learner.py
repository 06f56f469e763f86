"""Learner pieces that need no process group: LR schedule and the DeepSpeed config."""

from __future__ import annotations

import math

import pytest
import torch

from eopd_ray.config import config_from_dict
from eopd_ray.roles.learner_engine import deepspeed_config, lr_multiplier

BASE = {"model": {"student_path": "s", "teacher_path": "t"}, "data": {"toy_prompts": 8}}


def cfg(**learner):
    return config_from_dict(
        {**BASE, "learner": learner, "run": {"steps": 10}, "rollout": {"prompts_per_step": 8}}
    )


def test_cosine_with_warmup():
    c = cfg(lr_schedule="cosine", warmup_steps=2, mini_batch_size=4, min_lr_ratio=0.1)
    total = 10 * 2  # steps x updates per step
    assert lr_multiplier(c, 0) == pytest.approx(0.5)
    assert lr_multiplier(c, 1) == pytest.approx(1.0)
    assert lr_multiplier(c, 2) == pytest.approx(1.0)
    mid = 2 + (total - 2) // 2
    assert lr_multiplier(c, mid) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(c, total) == pytest.approx(0.1)


def test_constant_schedule():
    c = cfg(lr_schedule="constant", warmup_steps=0)
    assert {lr_multiplier(c, u) for u in range(50)} == {1.0}


def test_deepspeed_config_accumulates_micro_batches_into_the_mini_batch():
    c = cfg(mini_batch_size=8, micro_batch_size=2, num_workers=2, zero_stage=3, grad_clip=0.5)
    ds = deepspeed_config(c, world_size=2)
    assert ds["gradient_accumulation_steps"] == 2  # 8 / 2 ranks / 2 per micro-batch
    assert ds["train_batch_size"] == 8
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_accumulates_and_communicates_gradients_in_fp32(stage):
    c = config_from_dict(
        {
            **BASE,
            "model": {**BASE["model"], "dtype": "bfloat16"},
            "learner": {"zero_stage": stage, "mini_batch_size": 8, "micro_batch_size": 2},
            "rollout": {"prompts_per_step": 8},
        }
    )
    ds = deepspeed_config(c, world_size=2)
    assert ds["bf16"]["enabled"] is True
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32"
    # DeepSpeed 0.19.8 refuses fp32 accumulation without ZeRO: bf16 stage 0 runs as ZeRO-1.
    assert ds["zero_optimization"]["stage"] == max(stage, 1)
    assert "data_types" not in deepspeed_config(cfg(zero_stage=stage), world_size=1)


def test_response_lm_returns_the_tempered_response_logits(tiny_pair):
    from transformers import AutoModelForCausalLM

    from eopd_ray.core.forward import pack, response_logits
    from eopd_ray.roles.learner_engine import ResponseLM

    student, _ = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    ids, attention, positions = pack([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], 3)
    wrapped = ResponseLM(model, temperature=0.5)
    assert [n for n, _ in wrapped.hf.named_parameters()] == [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        got = wrapped(ids, attention, positions)
        want = response_logits(model, ids, attention, positions) / 0.5
    assert got.shape == (2, 3, model.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "settings, updates, dropout, expected",
    [
        ({}, 1, False, True),  # one update: its own forward is pi_old
        ({}, 2, False, False),  # the second update's weights are no longer those that sampled
        ({}, 1, True, False),  # train-mode dropout: that forward is not pi_old
        ({"old_logprobs_from_update": False}, 1, False, False),  # the switch off
        ({"old_logprobs": "sampler"}, 1, False, False),  # pi_old is the sampler's
    ],
)
def test_pi_old_comes_from_the_update_only_when_that_forward_is_pi_old(
    settings, updates, dropout, expected
):
    """The rule the learner and the driver's streamed step both apply (roles.learner)."""
    from eopd_ray.config.schema import updates_per_step
    from eopd_ray.roles.pi_old import old_from_update

    config = config_from_dict(
        {
            **BASE,
            "rollout": {"prompts_per_step": 8, "samples_per_prompt": 2},
            "learner": {"mini_batch_size": 16 // updates, "micro_batch_size": 4, **settings},
        }
    )
    assert updates_per_step(config) == updates
    assert old_from_update(config.learner, updates_per_step(config), dropout) is expected
