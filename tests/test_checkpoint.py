"""Checkpoints: complete or absent, a writer killed midway, keep-K, compatibility; on a local
disk and on an object store (pyarrow's in-memory filesystem, which has no rename)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pyarrow.fs as pafs
import pytest
import torch

from eopd_ray import checkpoint
from eopd_ray.config import config_from_dict
from eopd_ray.storage import RunStorage

BASE = {"model": {"student_path": "s", "teacher_path": "t"}, "data": {"toy_prompts": 8}}


def cfg(tmp_path, **run):
    return config_from_dict({**BASE, "run": {"output_dir": str(tmp_path), "id": "r1", **run}})


@pytest.fixture(params=["local", "object store"])
def store(request, tmp_path):
    if request.param == "local":
        return RunStorage(str(tmp_path))
    return RunStorage("bucket/run", filesystem=pafs._MockFileSystem())


def write(store, c, step: int, payload: bytes = b"weights") -> None:
    rel = checkpoint.begin(store, step)
    store.write_bytes(f"{rel}/learner/state.pt", payload)
    checkpoint.commit(
        store, rel, c, step, weight_version=step + 1, stream={"epoch": 0, "offset": step}
    )


def test_commit_is_all_or_nothing_and_keeps_the_last_k(tmp_path, store):
    c = cfg(tmp_path, keep_checkpoints=2)
    assert checkpoint.latest(store) is None
    for step in range(4):
        write(store, c, step)
    found = checkpoint.complete_checkpoints(store)
    assert [k.step for k in found] == [2, 3]
    assert found[-1].weight_version == 4 and found[-1].stream == {"epoch": 0, "offset": 3}
    assert found[-1].run_id == "r1"
    assert store.listdir("checkpoints") == ["step-000002", "step-000003"]


def test_a_checkpoint_without_its_state_file_is_ignored_and_cleared(tmp_path, store):
    """What a writer killed between the learners' files and state.json leaves behind."""
    c = cfg(tmp_path)
    write(store, c, 5, b"good")
    rel = checkpoint.begin(store, 6)
    store.write_bytes(f"{rel}/learner/state.pt", b"half")
    store.write_text(f"{rel}/state.json", '{"step": 6, "weight')  # torn, too
    newest = checkpoint.latest(store)
    assert newest.step == 5 and store.read_bytes(f"{newest.rel}/learner/state.pt") == b"good"
    write(store, c, 7)
    assert store.listdir("checkpoints") == ["step-000005", "step-000007"]


def test_a_writer_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    c = cfg(tmp_path)
    store = RunStorage(str(tmp_path))
    write(store, c, 5, b"good")
    code = (
        "import os\n"
        "from eopd_ray import checkpoint\n"
        "from eopd_ray.storage import RunStorage\n"
        f"store = RunStorage({str(tmp_path)!r})\n"
        "rel = checkpoint.begin(store, 6)\n"
        "store.write_bytes(rel + '/learner/state.pt', b'half')\n"
        "os._exit(9)  # killed before commit\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == 9
    newest = checkpoint.latest(store)
    assert newest.step == 5 and store.read_bytes(f"{newest.rel}/learner/state.pt") == b"good"
    assert "step-000006" in store.listdir("checkpoints")  # the debris is there...
    write(store, c, 7)
    assert "step-000006" not in store.listdir("checkpoints")  # ...and cleared next time


def test_breaking_config_changes_are_refused_with_the_reason(tmp_path, store):
    c = cfg(tmp_path)
    write(store, c, 1)
    ckpt = checkpoint.latest(store)
    checkpoint.check_compatible(cfg(tmp_path, steps=50), ckpt, store)  # more steps: fine
    changed = config_from_dict(
        {
            **BASE,
            "learner": {"num_workers": 2, "mini_batch_size": 8},
            "run": {"output_dir": str(tmp_path)},
        }
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"learner\.num_workers changed from 1"):
        checkpoint.check_compatible(changed, ckpt, store)


def test_rng_states_round_trip(tmp_path, store):
    c = cfg(tmp_path)
    random.seed(3)
    torch.manual_seed(3)
    write(store, c, 0)
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    checkpoint.restore_rng(checkpoint.latest(store))
    assert (random.random(), torch.rand(3).tolist()) == (expected[0], expected[1].tolist())
    state = json.loads(store.read_text("checkpoints/step-000000/state.json"))
    assert state["format"] == checkpoint.FORMAT
