"""Whole-pipeline fixtures: one real local Ray instance for the package, tiny models on disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"


def short_tmpdir(prefix: str) -> str:
    """Ray puts unix sockets under its temp dir: keep the path short (sockets max ~107 chars)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@pytest.fixture(scope="package")
def local_ray():
    """A real Ray on 127.0.0.1 in its own temp dir (never someone else's cluster)."""
    import ray

    from eopd_ray.driver.actors import WORKER_ENV

    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS is set: these tests start their own local Ray")
    temp = short_tmpdir("ray")
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp,
        runtime_env={"env_vars": WORKER_ENV},
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def tiny_overrides(models: tuple[Path, Path], out_dir: Path, *extra: str) -> list[str]:
    student, teacher = models
    return [
        f"model.student_path={student}",
        f"model.teacher_path={teacher}",
        "model.build_tiny=false",
        f"run.output_dir={out_dir}",
        *extra,
    ]


def sharpened_copy(student_dir: Path, out_dir: Path, scale: float) -> Path:
    """The model with its output layer scaled by `scale`: the same preferences, held more
    confidently. A student and a sharper teacher made this way give a learnable gap."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def toy_prepared(tmp_path_factory) -> Path:
    """The toy task prepared once per test run, with a shorter teacher training than the default
    (~30 s): still far better than the student."""
    import dataclasses

    from filelock import FileLock

    from eopd_ray.toy.prepare import ToySettings, prepare_toy

    settings = dataclasses.replace(ToySettings(), teacher_steps=600)
    # One preparation per test session: pytest-xdist workers share their base temp dir's parent.
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "toy-prepared"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / ".lock")):
        return prepare_toy(shared, settings, log=lambda m: None)


def sync_step_data(pipeline, step: int):
    """(batch, teacher scores, pi_old) of `step` made the synchronous way (`rollout.stream:
    false`) with the pipeline's current weights; it takes the step's prompts from the stream."""
    batch = pipeline.rollouts.collect(pipeline.rollouts.launch(step))
    scores = pipeline._score(batch, step)
    return batch, scores, learner_old_logprobs(pipeline, batch, pipeline._learner_shares(batch))


def learner_old_logprobs(pipeline, batch, shares):
    """pi_old of every row of `batch` as the learners compute it with their current weights,
    the rows dealt to the ranks as `shares` (a StepShares) says."""
    import torch

    parts = pipeline.learner.get(
        pipeline.learner.call_each_async(
            "old_logprobs", [(batch.select(rows), plan) for rows, plan in shares.ranks]
        ),
        300,
        "pi_old",
    )
    old = torch.zeros_like(batch.sampler_logprobs)
    for (rows, _), part in zip(shares.ranks, parts, strict=True):
        old[rows, : part.shape[1]] = part
    return old
