"""learner.gradient_checkpointing: auto (eopd_ray/core/memory_plan.py): on where a micro-batch's
activations would not fit the GPU, off elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from eopd_ray.config import ConfigError, config_from_dict, load_config
from eopd_ray.core.memory_plan import ACTIVATION_BYTES, checkpointing_needed, micro_batch_tokens

GB = 1e9
QWEN3_1_7B = {"layers": 28, "hidden": 2048, "parameters": 2.03e9}


def test_the_constant_reproduces_the_h200_measurement():
    """16 x 1,024 tokens without checkpointing peaked at 90 GB with ~27 GB of state."""
    activations = 16 * 1024 * QWEN3_1_7B["layers"] * QWEN3_1_7B["hidden"] * ACTIVATION_BYTES
    assert 55 * GB < activations < 70 * GB


@pytest.mark.parametrize(
    "tokens, world, device_gb, needed",
    [
        (20480, 2, 80, True),  # the paper recipe's budget on A100-80GB learners
        (4096, 2, 80, False),  # a small budget fits
        (8192, 1, 141, False),  # 8 x 1,024 on an H200: fits (0.330 s/step without, 0.397 with)
        (16384, 1, 40, True),
    ],
)
def test_the_rule(tokens, world, device_gb, needed):
    got = checkpointing_needed(tokens, world_size=world, device_bytes=device_gb * GB, **QWEN3_1_7B)
    assert got is needed


def test_config_takes_auto_and_the_paper_recipe_uses_it():
    base = {"model": {"student_path": "s", "teacher_path": "t"}, "data": {"toy_prompts": 8}}
    cfg = config_from_dict(base, ["learner.gradient_checkpointing=auto"])
    assert cfg.learner.gradient_checkpointing == "auto"
    assert micro_batch_tokens(cfg) == cfg.learner.micro_batch_size * (512 + 64)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        config_from_dict(base, ["learner.gradient_checkpointing=sometimes"])
    paper = load_config(Path(__file__).parents[1] / "jobs/configs/paper/qwen3-1.7b-eopd.yaml")
    assert paper.learner.gradient_checkpointing == "auto"
    assert micro_batch_tokens(paper) == 20480


def test_auto_is_off_on_cpu():
    from eopd_ray.roles.learner_engine import gradient_checkpointing_on

    base = {"model": {"student_path": "s", "teacher_path": "t"}, "data": {"toy_prompts": 8}}
    cfg = config_from_dict(base, ["learner.gradient_checkpointing=auto"])
    assert gradient_checkpointing_on(cfg, model=None, on_gpu=False, world_size=1) is False
