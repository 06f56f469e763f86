"""Checkpoint directories: atomic commit, a writer killed midway, keep-K, compatibility."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from eopd_ray import checkpoint
from eopd_ray.config import config_from_dict

BASE = {"model": {"student_path": "s", "teacher_path": "t"}, "data": {"toy_prompts": 8}}


def cfg(tmp_path, **run):
    return config_from_dict({**BASE, "run": {"output_dir": str(tmp_path), **run}})


def write(c, step: int, payload: bytes = b"weights") -> None:
    tmp = checkpoint.begin(c, step)
    (tmp / "learner" / "state.pt").write_bytes(payload)
    checkpoint.commit(c, tmp, step, weight_version=step + 1, stream={"epoch": 0, "offset": step})


def test_commit_is_all_or_nothing_and_keeps_the_last_k(tmp_path):
    c = cfg(tmp_path, keep_checkpoints=2)
    assert checkpoint.latest(c) is None
    for step in range(4):
        write(c, step)
    found = checkpoint.complete_checkpoints(c)
    assert [k.step for k in found] == [2, 3]
    assert found[-1].weight_version == 4 and found[-1].stream == {"epoch": 0, "offset": 3}
    assert not list(checkpoint.checkpoint_root(c).glob(".tmp-*"))


def test_a_writer_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    c = cfg(tmp_path)
    write(c, 5, b"good")
    code = (
        "import os, sys\n"
        "from eopd_ray import checkpoint\n"
        "from eopd_ray.config import config_from_dict\n"
        f"c = config_from_dict({BASE!r} | {{'run': {{'output_dir': {str(tmp_path)!r}}}}})\n"
        "tmp = checkpoint.begin(c, 6)\n"
        "(tmp / 'learner' / 'state.pt').write_bytes(b'half')\n"
        "os._exit(9)  # killed before commit\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 9
    newest = checkpoint.latest(c)
    assert newest.step == 5 and (newest.path / "learner" / "state.pt").read_bytes() == b"good"
    assert list(checkpoint.checkpoint_root(c).glob(".tmp-*"))  # the debris is there...
    write(c, 7)
    assert not list(checkpoint.checkpoint_root(c).glob(".tmp-*"))  # ...and cleared next time


def test_breaking_config_changes_are_refused_with_the_reason(tmp_path):
    c = cfg(tmp_path)
    write(c, 1)
    ckpt = checkpoint.latest(c)
    checkpoint.check_compatible(cfg(tmp_path, steps=50), ckpt)  # more steps: fine
    changed = config_from_dict(
        {
            **BASE,
            "learner": {"num_workers": 2, "mini_batch_size": 8},
            "run": {"output_dir": str(tmp_path)},
        }
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"learner\.num_workers changed from 1"):
        checkpoint.check_compatible(changed, ckpt)


def test_rng_states_round_trip(tmp_path):
    c = cfg(tmp_path)
    random.seed(3)
    torch.manual_seed(3)
    write(c, 0)
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    checkpoint.restore_rng(checkpoint.latest(c))
    assert (random.random(), torch.rand(3).tolist()) == (expected[0], expected[1].tolist())
    assert json.loads((checkpoint.latest(c).path / "state.json").read_text())["format"] == 1
