"""A run directory belongs to one run: a fresh start moves an earlier run aside; resume only
continues the run that wrote the checkpoints; ids are kept."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from eopd_ray.config import config_from_dict, config_to_yaml
from eopd_ray.storage import checkpoint
from eopd_ray.storage.checkpoint import CheckpointError
from eopd_ray.storage.run_dir import begin_run
from eopd_ray.storage.run_storage import RunStorage

BASE = {"model": {"student_path": "s", "teacher_path": "t"}, "data": {"toy_prompts": 8}}


def cfg(resume: str, **run):
    return config_from_dict({**BASE, "run": {"output_dir": "/unused", "resume": resume, **run}})


def started(store, c):
    """What Pipeline.start does with the directory: decide, then write the config."""
    c, ckpt = begin_run(c, store)
    store.write_text("config.yaml", config_to_yaml(c))
    store.write_text("metrics.jsonl", f'{{"run": "{c.run.id}"}}\n')
    return c, ckpt


def checkpointed(store, c, step):
    rel = checkpoint.begin(store, step)
    store.write_bytes(f"{rel}/learner/state.pt", b"weights")
    checkpoint.commit(
        store, rel, c, step, step + 1, {"epoch": 0, "offset": step}, ["learner/state.pt"]
    )


def test_resume_never_moves_the_earlier_run_aside_so_auto_cannot_mix_runs(store):
    """The sequence that once mixed two runs: A (never) checkpoints step 36; B (never) starts
    afresh and checkpoints step 21; C (auto) must continue B, from 21, not A's 36."""
    a, _ = started(store, cfg("never", name="toy"))
    checkpointed(store, a, 36)
    b, ckpt = started(store, cfg("never", name="toy"))
    assert ckpt is None and b.run.id != a.run.id and b.run.id.startswith("toy-")
    assert store.listdir() == ["config.yaml", "metrics.jsonl", "previous"]
    assert store.listdir(f"previous/{a.run.id}") == ["checkpoints", "config.yaml", "metrics.jsonl"]
    checkpointed(store, b, 21)
    c, ckpt = started(store, cfg("auto", name="toy"))
    assert ckpt.step == 21 and ckpt.run_id == b.run.id and c.run.id == b.run.id


def test_auto_without_a_checkpoint_starts_afresh_and_moves_leftovers(store):
    a, _ = started(store, cfg("auto"))  # crashed before its first checkpoint
    b, ckpt = started(store, cfg("auto"))
    assert ckpt is None and b.run.id != a.run.id
    assert store.listdir("previous") == [a.run.id]


def test_an_explicit_run_id_that_is_not_the_directorys_is_refused(store):
    a, _ = started(store, cfg("auto", id="mine"))
    assert a.run.id == "mine"
    checkpointed(store, a, 3)
    with pytest.raises(CheckpointError, match=r"holds run 'mine'.*run\.resume=never"):
        begin_run(cfg("auto", id="other"), store)
    again, ckpt = begin_run(cfg("auto", id="mine"), store)
    assert ckpt.step == 3 and again.run.id == "mine"


def test_the_same_id_moved_aside_twice_keeps_both(store):
    for _ in range(3):
        started(store, cfg("never", id="demo"))
    assert store.listdir("previous") == ["demo", "demo.2"]


def test_only_the_runs_own_outputs_move(store):
    """tiny.yaml builds its models inside its output directory: they are not the run's."""
    store.write_text("models/student/config.json", "{}")
    started(store, cfg("never"))
    started(store, cfg("never"))
    assert store.exists("models/student/config.json")
    assert "models" not in store.listdir(f"previous/{store.listdir('previous')[0]}")


# ----------------------------------------------------------------------------- object stores


@pytest.fixture
def s3_like(tmp_path, monkeypatch):
    """An object store whose server-side copy refuses sources over 1 KiB, as S3's CopyObject
    refuses sources over 5 GiB (storage.SERVER_COPY_MAX_BYTES scaled down with it)."""
    from faulty_fs import FaultyFS

    from eopd_ray.storage import run_storage as storage

    root = tmp_path / "bucket"
    root.mkdir()
    handler = FaultyFS(root)
    handler.server_copy_max_bytes = 1024
    monkeypatch.setattr(storage, "SERVER_COPY_MAX_BYTES", 1024)
    return handler, RunStorage("run", filesystem=pafs.PyFileSystem(handler))


def test_moving_a_run_aside_streams_files_too_large_for_a_server_side_copy(s3_like):
    """Review finding 5: `RunStorage.move` was one CopyObject per file, refused for a ZeRO
    optimizer shard over 5 GiB, so resume=never could not move a 1.7B run aside on S3."""
    handler, store = s3_like
    a, _ = started(store, cfg("never", id="big"))
    rel = checkpoint.begin(store, 3)
    shard = bytes(range(256)) * 40  # 10 KiB: "over 5 GiB"
    store.write_bytes(f"{rel}/learner/zero_pp_rank_0_optim_states.pt", shard)
    store.write_bytes(f"{rel}/learner/state.pt", b"small")
    checkpoint.commit(store, rel, a, 3, 4, {"epoch": 0, "offset": 3}, ["learner/state.pt"])
    started(store, cfg("never", id="next"))
    moved = "previous/big/checkpoints/step-000003"
    assert store.read_bytes(f"{moved}/learner/zero_pp_rank_0_optim_states.pt") == shard
    assert not any(size > 1024 for _, size in handler.server_copies)  # streamed, not copied
    assert store.listdir("previous/big") == ["checkpoints", "config.yaml", "metrics.jsonl"]


def test_an_interrupted_move_is_finished_in_place_by_the_next_start(s3_like):
    """A connection lost half-way used to leave a partial copy per attempt; now the next start
    finishes the same move, and no half-moved checkpoint ever looks complete."""
    handler, store = s3_like
    a, _ = started(store, cfg("never", id="old"))
    for step in (1, 2):
        checkpointed(store, a, step)
    handler.fail_after_writes = 3
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        started(store, cfg("never", id="new"))
    assert checkpoint.latest(store) is None  # markers go first: nothing half-moved is complete
    handler.fail_after_writes = None
    b, ckpt = started(store, cfg("never", id="new"))
    assert ckpt is None and b.run.id == "new"
    assert store.listdir("previous") == ["old"]  # one copy, not old + old.2
    assert store.listdir("previous/old") == ["checkpoints", "config.yaml", "metrics.jsonl"]
    old_store = RunStorage("run/previous/old", filesystem=store.fs)
    assert [k.step for k in checkpoint.complete_checkpoints(old_store)] == [1, 2]
