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
from faulty_fs import FaultyFS

from eopd_ray.config import config_from_dict
from eopd_ray.storage import checkpoint
from eopd_ray.storage.learner_files import learner_file_sizes
from eopd_ray.storage.run_storage import RunStorage

BASE = {"model": {"student_path": "s", "teacher_path": "t"}, "data": {"toy_prompts": 8}}


def cfg(tmp_path, **run):
    return config_from_dict({**BASE, "run": {"output_dir": str(tmp_path), "id": "r1", **run}})


@pytest.fixture(params=["local", "object store", "s3"])
def store(request, tmp_path):
    if request.param == "s3":  # a real S3 endpoint (moto's server)
        return RunStorage(request.getfixturevalue("s3").uri(f"runs/{tmp_path.name}"))
    if request.param == "local":
        return RunStorage(str(tmp_path))
    return RunStorage("bucket/run", filesystem=pafs._MockFileSystem())


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]


def write(store, c, step: int, payload: bytes = b"weights", prompts=PROMPTS) -> None:
    rel = checkpoint.begin(store, step)
    store.write_bytes(f"{rel}/learner/state.pt", payload)
    checkpoint.commit(
        store,
        rel,
        c,
        step,
        weight_version=step + 1,
        stream={"epoch": 0, "offset": step},
        learner_files=["learner/state.pt"],
        trained_on=checkpoint.training_identity(c, prompts),
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
        "from eopd_ray.storage import checkpoint\n"
        "from eopd_ray.storage.run_storage import RunStorage\n"
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


# ----------------------------------------------------------------------------- review findings


def test_a_read_error_is_not_a_missing_checkpoint_and_deletes_nothing(tmp_path):
    """Review finding 2: a transient error reading state.json made begin() delete the newest
    complete checkpoint, and begin_run start the run afresh (moving it to previous/)."""
    from eopd_ray.storage.run_dir import begin_run

    root = tmp_path / "disk"
    root.mkdir()
    handler = FaultyFS(root)
    store = RunStorage("run", filesystem=pafs.PyFileSystem(handler))
    c = cfg(tmp_path)
    write(store, c, 4, b"good")
    store.write_text("config.yaml", checkpoint.stored_config_yaml(c))
    handler.unreadable = "state.json"
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot read run/checkpoints/step-0+4"):
        checkpoint.latest(store)
    with pytest.raises(checkpoint.CheckpointError, match="503"):
        begin_run(cfg(tmp_path, id=None), store)
    begin_run_left = sorted(p.name for p in (root / "run").iterdir())
    assert "previous" not in begin_run_left and "checkpoints" in begin_run_left
    checkpoint.begin(store, 5)  # clean-up: a directory holding state.json is never deleted
    handler.unreadable = None
    assert checkpoint.latest(store).step == 4
    assert store.read_bytes("checkpoints/step-000004/learner/state.pt") == b"good"


def test_an_unparsable_state_file_is_skipped_but_never_deleted(tmp_path, store):
    c = cfg(tmp_path)
    write(store, c, 1)
    store.write_text("checkpoints/step-000001/state.json", "{not json")
    assert checkpoint.latest(store) is None
    write(store, c, 2)
    assert store.listdir("checkpoints") == ["step-000001", "step-000002"]


def test_commit_refuses_a_checkpoint_without_its_learner_files(tmp_path, store):
    """Review finding 3: a second driver deleted the in-flight checkpoint as incomplete, and the
    first one's commit then marked an empty directory complete (every later resume failed)."""
    c = cfg(tmp_path)
    write(store, c, 1, b"good")
    rel = checkpoint.begin(store, 2)
    store.write_bytes(f"{rel}/learner/state.pt", b"new")
    store.delete(rel)  # what the other driver's begin() did
    store.makedirs(rel)
    with pytest.raises(checkpoint.CheckpointError, match="1 of 1 learner files"):
        checkpoint.commit(store, rel, c, 2, 3, {"epoch": 0, "offset": 2}, ["learner/state.pt"])
    with pytest.raises(checkpoint.CheckpointError, match="no files"):
        checkpoint.commit(store, rel, c, 2, 3, {"epoch": 0, "offset": 2}, [])
    assert checkpoint.latest(store).step == 1


@pytest.mark.parametrize(
    "override,why",
    [
        ({"loss": {"name": "opd"}}, r"loss\.name changed from 'eopd' to 'opd'"),
        ({"loss": {"entropy_threshold": 0.5}}, r"loss\.entropy_threshold changed"),
    ],
)
def test_resuming_with_another_loss_is_refused_unless_allowed(tmp_path, store, override, why):
    """Review finding 4: an EOPD run resumed with loss.name=opd appended a hybrid to its
    metrics."""
    c = cfg(tmp_path)
    write(store, c, 1)
    ckpt = checkpoint.latest(store)
    identity = checkpoint.training_identity(c, PROMPTS)
    changed = config_from_dict({**BASE, **override, "run": {"output_dir": str(tmp_path)}})
    with pytest.raises(checkpoint.CheckpointError, match=why + r".*run\.allow_config_change"):
        checkpoint.check_compatible(changed, ckpt, store, identity)
    allowed = config_from_dict(
        {**BASE, **override, "run": {"output_dir": str(tmp_path), "allow_config_change": True}}
    )
    assert len(checkpoint.check_compatible(allowed, ckpt, store, identity)) == 1


def test_resuming_on_other_kept_prompts_is_refused(tmp_path, store):
    """The data position indexes the kept prompts: one prompt fewer (another max_prompt_tokens,
    an edited file) would re-train some prompts and skip others."""
    c = cfg(tmp_path)
    write(store, c, 1)
    ckpt = checkpoint.latest(store)
    same = checkpoint.training_identity(c, [list(p) for p in PROMPTS])
    assert checkpoint.check_compatible(c, ckpt, store, same) == []
    for prompts in (PROMPTS[:2], [[1, 2, 3], [4, 5], [6, 7, 8, 10]]):
        with pytest.raises(checkpoint.CheckpointError, match="the kept prompts differ"):
            checkpoint.check_compatible(c, ckpt, store, checkpoint.training_identity(c, prompts))


def test_resuming_with_a_moved_cosine_schedule_is_refused(tmp_path, store):
    """Longer run.steps or another mini-batch stretches a cosine schedule (lr 0.39 -> 0.59 of
    its peak at update 400 for 175 -> 225 steps); a constant schedule does not move."""
    cosine = {"learner": {"lr_schedule": "cosine"}}
    c = config_from_dict({**BASE, **cosine, "run": {"output_dir": str(tmp_path), "steps": 10}})
    write(store, c, 1)
    ckpt = checkpoint.latest(store)
    longer = config_from_dict({**BASE, **cosine, "run": {"output_dir": str(tmp_path), "steps": 20}})
    with pytest.raises(checkpoint.CheckpointError, match=r"total_updates 10 -> 20"):
        checkpoint.check_compatible(
            longer, ckpt, store, checkpoint.training_identity(longer, PROMPTS)
        )
    constant = {"learner": {"lr_schedule": "constant"}}
    c = config_from_dict({**BASE, **constant, "run": {"output_dir": str(tmp_path), "steps": 10}})
    write(store, c, 2)
    ckpt = checkpoint.latest(store)
    longer = config_from_dict(
        {**BASE, **constant, "run": {"output_dir": str(tmp_path), "steps": 20}}
    )
    identity = checkpoint.training_identity(longer, PROMPTS)
    assert checkpoint.check_compatible(longer, ckpt, store, identity) == []


def test_an_endpoint_that_stops_mid_checkpoint_loses_nothing(s3, tmp_path):
    """S3 answering 503 from the middle of the learners' upload on (after pyarrow's retries): an
    error naming the URI (pyarrow's copy_files alone would have reported success), the newest
    complete checkpoint stays the resume point, and the next attempt at that step starts clean."""
    from eopd_ray.storage.run_storage import BackgroundUpload, StorageError

    store = RunStorage(s3.uri(f"runs/{tmp_path.name}"))
    c = cfg(tmp_path)
    write(store, c, 0, b"good")
    rel = checkpoint.begin(store, 1)
    local = store.staging(f"{rel}/learner")
    for rank in range(6):
        (local / f"rank-{rank}.pt").write_bytes(random.randbytes(2048))
    with s3.outage(after_uploads=2), pytest.raises(StorageError) as err:
        # As a learner uploads while the next step trains; the error surfaces at the commit.
        BackgroundUpload(store, local, f"{rel}/learner").join()
    assert store.show(f"{rel}/learner") in str(err.value)
    uploaded = [k for k in s3.keys(f"runs/{tmp_path.name}/{rel}") if k.endswith(".pt")]
    assert 0 < len(uploaded) < 6, uploaded  # it did stop half-way
    newest = checkpoint.latest(store)
    assert newest.step == 0 and store.read_bytes(f"{newest.rel}/learner/state.pt") == b"good"
    write(store, c, 1)
    assert [k.step for k in checkpoint.complete_checkpoints(store)] == [0, 1]
    assert store.listdir(f"{checkpoint.step_dir(1)}/learner") == ["state.pt"]


# ------------------------------------------------------------------- issue 31, finding 5


def test_commit_refuses_a_learner_file_of_another_size(tmp_path, store):
    """A rank's upload cut short leaves a file that exists but is not whole."""
    c = cfg(tmp_path)
    write(store, c, 1, b"good")
    rel = checkpoint.begin(store, 2)
    store.write_bytes(f"{rel}/learner/state.pt", b"half")
    store.write_bytes(f"{rel}/learner/latest", b"learner")
    reported = learner_file_sizes(
        [{"learner/state.pt": 4096, "learner/latest": 7}, ["learner/latest"]]
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"learner/state\.pt \(4 of 4096 bytes\)"):
        checkpoint.commit(store, rel, c, 2, 3, {"epoch": 0, "offset": 2}, reported)
    assert checkpoint.latest(store).step == 1
    store.write_bytes(f"{rel}/learner/state.pt", bytes(4096))
    assert checkpoint.commit(store, rel, c, 2, 3, {"epoch": 0, "offset": 2}, reported).step == 2


def test_two_ranks_reporting_one_file_with_two_sizes_are_refused():
    with pytest.raises(checkpoint.CheckpointError, match=r"rank 1 reports latest with 9 bytes"):
        learner_file_sizes([{"latest": 7}, {"latest": 9}])
    assert learner_file_sizes([["a"], {"a": 3, "b": 1}, ["b"]]) == {"a": 3, "b": 1}


class FakeLearnerGroup:
    """The driver's learner group as RunCheckpoints.commit_uploaded uses it: `upload_state` answers
    one list per poll (one state per rank, as LearnerWorker.upload_state)."""

    def __init__(self, polls: list[list[str]]) -> None:
        self.polls = polls

    def call_async(self, method: str, *args) -> list:
        assert method == "upload_state", method
        return self.polls.pop(0)

    def get(self, refs: list, timeout_s: float, what: str) -> list:
        return refs


class FakeClaim:
    def check(self, what: str) -> None:
        pass


def test_a_failed_upload_is_reported_while_another_rank_still_uploads(tmp_path, store):
    """Rank 1's upload failed while rank 0's still ran: its error (reported once, then
    forgotten by the learner) was dropped, and the checkpoint committed once rank 0 finished."""
    from types import SimpleNamespace

    from eopd_ray.core.prompts import PromptStream
    from eopd_ray.driver.run_checkpoints import RunCheckpoints
    from eopd_ray.driver.run_state import RunState, SavedState
    from eopd_ray.errors import EopdError

    learner = FakeLearnerGroup(
        [["running", "uploading ... failed (503)"], ["done", "none"], ["none", "none"]]
    )
    state = RunState.begin(PromptStream(len(PROMPTS)))
    groups = SimpleNamespace(learner=learner)
    driver = RunCheckpoints(cfg(tmp_path), store, FakeClaim(), groups, None, state, PROMPTS)
    rel = checkpoint.begin(store, 3)
    store.write_bytes(f"{rel}/learner/rank-0.pt", b"zero")
    written = [["learner/rank-0.pt"], ["learner/rank-1.pt"]]
    saved = SavedState(3, 4, {"epoch": 0, "offset": 3}, checkpoint.rng_state())
    driver._uploading = (rel, written, saved)  # as save(3, wait=False) leaves it on S3
    with pytest.raises(EopdError, match=r"learner\[1\]: uploading \.\.\. failed \(503\)"):
        driver.commit_uploaded(wait=False)
    assert driver.commit_uploaded(wait=False) is None  # nothing left to commit
    assert checkpoint.latest(store) is None


# ------------------------------------------------------------------ issue 31, finding 10


def test_an_unparsable_checkpoint_saved_again_is_moved_aside_not_deleted(tmp_path, store):
    """A resume from an older checkpoint (the newest one's state.json does not parse) reaches
    that step again: begin() deleted the directory its docstring said was kept."""
    c = cfg(tmp_path)
    write(store, c, 1, b"first")
    store.write_text("checkpoints/step-000001/state.json", "{not json")
    write(store, c, 1, b"again")
    assert checkpoint.latest(store).step == 1
    assert store.read_bytes("checkpoints/step-000001/learner/state.pt") == b"again"
    kept = [n for n in store.listdir("checkpoints") if n != "step-000001"]
    assert len(kept) == 1 and kept[0].startswith("kept-step-000001-unparsable-"), kept
    assert store.read_text(f"checkpoints/{kept[0]}/state.json") == "{not json"
    assert store.read_bytes(f"checkpoints/{kept[0]}/learner/state.pt") == b"first"
    write(store, c, 2)  # neither a checkpoint nor debris: later clean-ups leave it
    assert kept[0] in store.listdir("checkpoints")


# ------------------------------------------------------------------- issue 31, finding 6


def deepspeed_names(world_size: int, zero_stage: int, bf16: bool) -> dict[int, set[str]]:
    """rank -> the learner files DeepSpeed's own naming gives that rank's files (relative to a
    checkpoint, tag "learner"); rank -1: the files every rank shares."""
    from types import SimpleNamespace

    engine = pytest.importorskip("deepspeed.runtime.engine").DeepSpeedEngine
    fake = SimpleNamespace(
        checkpoint_mp_rank=0,
        zero_optimization_partition_weights=lambda: zero_stage == 3,
        _get_zero_ckpt_prefix=lambda dp_rank, bf16_mode: engine._get_zero_ckpt_prefix(
            None, dp_rank, bf16_mode
        ),
    )
    names: dict[int, set[str]] = {-1: {"latest", "zero_to_fp32.py"}}
    for rank in range(world_size):
        optim = engine._get_rank_zero_ckpt_name(fake, "", "learner", 0, rank, bf16)
        model = engine._get_ckpt_name(fake, "", "learner", pp_placeholder=str(rank))
        names[rank] = {optim}
        names[rank if zero_stage == 3 else -1].add(model)
    return names


@pytest.mark.parametrize("zero_stage,bf16", [(1, True), (2, False), (3, True)])
def test_a_resuming_rank_fetches_its_own_shards_and_the_shared_files(
    tmp_path, store, zero_stage, bf16
):
    from eopd_ray.storage.learner_files import files_of_rank

    names = deepspeed_names(4, zero_stage, bf16)
    rel = checkpoint.step_dir(7)
    for files in names.values():
        for name in files:
            store.write_bytes(f"{rel}/{name}", name.encode())
    fetched = store.fetch(rel, keep=files_of_rank(2))
    local = {p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()}
    assert names[-1] | names[2] <= local  # what DeepSpeed reads for rank 2
    if not store.is_local:  # downloaded: nothing of ranks 0, 1 and 3
        assert local == names[-1] | names[2]
    for name in names[-1] | names[2]:
        assert (fetched / name).read_bytes() == name.encode()


# ------------------------------------------------------------------- issue 31, finding 7


def with_models(tmp_path, student: str, teacher: str, **run):
    return config_from_dict(
        {
            **BASE,
            "model": {"student_path": student, "teacher_path": teacher},
            "run": {"output_dir": str(tmp_path), **run},
        }
    )


def test_resuming_with_another_teacher_is_refused_unless_allowed(tmp_path, store):
    write(store, cfg(tmp_path), 1)
    ckpt = checkpoint.latest(store)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"model\.teacher_path changed from 't' to 't2'.*run\.allow_config_change=true",
    ):
        checkpoint.check_compatible(with_models(tmp_path, "s", "t2"), ckpt, store)
    allowed = with_models(tmp_path, "s", "t2", allow_config_change=True)
    assert checkpoint.check_compatible(allowed, ckpt, store) == [
        "model.teacher_path changed from 't' to 't2' (the rest of the run would distill another "
        "teacher)"
    ]


def test_a_model_uri_whose_objects_changed_since_the_checkpoint_is_refused(tmp_path, store):
    uri = "s3://bucket/models/teacher?endpoint_override=127.0.0.1:9&scheme=http"
    then, now = f"{uri}#listing={'a' * 16}", f"{uri}#listing={'b' * 16}"
    write(store, with_models(tmp_path, "s", then), 1)
    ckpt = checkpoint.latest(store)
    assert checkpoint.check_compatible(with_models(tmp_path, "s", then), ckpt, store) == []
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.check_compatible(with_models(tmp_path, "s", now), ckpt, store)
    assert f"the objects at {uri!r} changed since the checkpoint (listing {'a' * 16}, now" in str(
        err.value
    )
    allowed = with_models(tmp_path, "s", now, allow_config_change=True)
    assert len(checkpoint.check_compatible(allowed, ckpt, store)) == 1
    # A checkpoint from before URIs were pinned cannot tell: resumed as the same objects.
    write(store, with_models(tmp_path, "s", uri), 2)
    ckpt = checkpoint.latest(store)
    assert checkpoint.check_compatible(with_models(tmp_path, "s", now), ckpt, store) == []


def test_a_gguf_file_of_another_sha256_since_the_checkpoint_is_refused(tmp_path, store):
    then, now = f"runs/models/t.gguf#sha256={'a' * 64}", f"runs/models/t.gguf#sha256={'b' * 64}"
    write(store, with_models(tmp_path, "s", then), 1)
    ckpt = checkpoint.latest(store)
    assert checkpoint.check_compatible(with_models(tmp_path, "s", then), ckpt, store) == []
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.check_compatible(with_models(tmp_path, "s", now), ckpt, store)
    assert (
        f"model.teacher_path: the GGUF file 'runs/models/t.gguf' changed since the checkpoint "
        f"(sha256 {'a' * 64}, now {'b' * 64})" in str(err.value)
    )
    allowed = with_models(tmp_path, "s", now, allow_config_change=True)
    assert len(checkpoint.check_compatible(allowed, ckpt, store)) == 1


def test_another_student_stays_refused_even_when_allowed(tmp_path, store):
    write(store, cfg(tmp_path), 1)
    ckpt = checkpoint.latest(store)
    other = with_models(tmp_path, "s2", "t", allow_config_change=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.student_path changed from 's'"):
        checkpoint.check_compatible(other, ckpt, store)


SECRET_URI = "s3://AKIAEOPD:sEcReTkEy@bucket/{}?endpoint_override=127.0.0.1:9&scheme=http"


def test_credentials_in_uris_are_masked_in_the_checkpoints_config_and_its_messages(tmp_path, store):
    """Issue 33: `s3://KEY:SECRET@bucket/...` (the form pyarrow accepts) was saved as given. The
    file holds it masked; a resume with the same URIs (credentials and all) is the same run."""
    teacher = SECRET_URI.format("models/teacher")
    c = config_from_dict(
        {
            "model": {"student_path": "s", "teacher_path": f"{teacher}#listing={'a' * 16}"},
            "data": {"train_path": SECRET_URI.format("data/train.jsonl")},
            "run": {"output_dir": SECRET_URI.format("run"), "id": "r1"},
        }
    )
    write(store, c, 1)
    saved = store.read_text("checkpoints/step-000001/config.yaml")
    assert "AKIAEOPD" not in saved and "sEcReTkEy" not in saved
    assert "s3://***@bucket/models/teacher?endpoint_override=127.0.0.1:9" in saved
    ckpt = checkpoint.latest(store)
    assert checkpoint.check_compatible(c, ckpt, store) == []
    changed = config_from_dict(
        {
            "model": {"student_path": "s", "teacher_path": f"{teacher}#listing={'b' * 16}"},
            "data": {"train_path": SECRET_URI.format("data/other.jsonl")},
            "run": {"output_dir": SECRET_URI.format("run"), "id": "r1"},
        }
    )
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.check_compatible(changed, ckpt, store)
    message = str(err.value)
    assert "data.train_path changed from 's3://***@bucket/data/train.jsonl" in message
    assert "the objects at 's3://***@bucket/models/teacher" in message
    assert "AKIAEOPD" not in message and "sEcReTkEy" not in message
