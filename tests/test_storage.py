"""Run storage over pyarrow filesystems: local disk, an in-memory object store (no rename), and
a sub-tree filesystem (the object-store code path on the local disk, shared by processes)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from eopd_ray.storage.run_storage import RunStorage, StorageError, is_uri


@pytest.fixture(params=["local", "memory", "subtree", "s3"])
def store(request, tmp_path):
    if request.param == "s3":  # a real S3 endpoint (moto's server)
        return RunStorage(request.getfixturevalue("s3").uri(f"runs/{tmp_path.name}"))
    if request.param == "local":
        return RunStorage(str(tmp_path / "run"))
    if request.param == "memory":
        return RunStorage("bucket/run", filesystem=pafs._MockFileSystem())
    return RunStorage(
        "run", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    )


def test_text_files_lists_moves_and_deletes(store):
    store.write_text("a/b.json", '{"x": 1}')
    store.write_text("a/b.json", '{"x": 2}')  # replaced whole
    assert store.read_text("a/b.json") == '{"x": 2}'
    assert store.listdir("a") == ["b.json"] and store.listdir("missing") == []
    store.move("a", "c/a")
    assert store.listdir() == ["c"] and store.read_text("c/a/b.json") == '{"x": 2}'
    store.delete("c")
    store.delete("c")  # missing: nothing to do
    assert not store.exists("c")


def test_staged_directories_are_published_and_fetched_back(store, tmp_path):
    scratch = store.staging("ckpt/learner")
    (scratch / "learner").mkdir()
    (scratch / "learner" / "rank0.pt").write_bytes(b"zero")
    (scratch / "latest").write_text("learner")
    store.publish(scratch, "ckpt/learner")
    other = store.staging("ckpt/learner")  # a second rank, on its own scratch space
    (other / "learner").mkdir(exist_ok=True)
    (other / "learner" / "rank1.pt").write_bytes(b"one")
    store.publish(other, "ckpt/learner")
    assert store.listdir("ckpt/learner/learner") == ["rank0.pt", "rank1.pt"]
    fetched = store.fetch("ckpt/learner")
    assert (fetched / "learner" / "rank1.pt").read_bytes() == b"one"
    assert (fetched / "latest").read_text() == "learner"
    if not store.is_local:
        assert not scratch.exists()  # uploaded, then dropped


def test_local_storage_writes_in_place_and_shows_its_absolute_path(tmp_path):
    store = RunStorage(str(tmp_path / "run"))
    assert store.is_local and store.uri == str(tmp_path / "run")
    assert store.staging("x") == tmp_path / "run" / "x"
    uri = RunStorage(f"file://{tmp_path}/run")
    assert uri.is_local and uri.uri == str(tmp_path / "run")


def test_paths_below_a_uri_with_a_query_keep_the_query_last():
    """Review finding 8: `s3://b/run?endpoint_override=...` was shown (and returned by the HF
    export) as `...&scheme=http/checkpoints/step-000001`."""
    from eopd_ray.storage import checkpoint

    store = RunStorage("s3://bucket/run?endpoint_override=127.0.0.1:9&scheme=http")
    assert store.root == "bucket/run" and store.path("hf") == "bucket/run/hf"
    want = "s3://bucket/run/checkpoints/step-000001?endpoint_override=127.0.0.1:9&scheme=http"
    assert store.show("checkpoints/step-000001") == want
    assert store.show() == store.uri == "s3://bucket/run?endpoint_override=127.0.0.1:9&scheme=http"
    state = {"step": 1, "weight_version": 2, "stream": {}, "rng": {}}
    assert checkpoint._checkpoint(store, "checkpoints/step-000001", state).uri == want


def test_a_storage_pickles_as_its_location(tmp_path):
    store = RunStorage(str(tmp_path))
    store.write_text("f", "hi")
    again = pickle.loads(pickle.dumps(store))
    assert again.read_text("f") == "hi"
    shared = RunStorage(
        "run", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    )
    shared.write_text("g", "there")
    assert pickle.loads(pickle.dumps(shared)).read_text("g") == "there"


def test_bad_locations_say_what_to_do():
    assert is_uri("s3://b/k") and is_uri("file:///x") and not is_uri("/abs") and not is_uri("rel")
    with pytest.raises(StorageError, match="relative path"):
        _ = RunStorage("runs/x").fs
    with pytest.raises(StorageError, match=r"nope://bucket.*s3://"):
        _ = RunStorage("nope://bucket/run").fs


def test_fetch_downloads_only_the_files_kept_each_checked_whole(store):
    """Issue 31 finding 6: every learner rank downloaded every rank's optimizer shards."""
    store.write_bytes("ckpt/learner/mine.pt", b"1" * 3000)
    store.write_bytes("ckpt/learner/theirs.pt", b"2" * 5000)
    store.write_text("ckpt/latest", "learner")
    fetched = store.fetch("ckpt", keep=lambda path: "theirs" not in path)
    assert (fetched / "learner" / "mine.pt").read_bytes() == b"1" * 3000
    assert (fetched / "latest").read_text() == "learner"
    if not store.is_local:  # a local store is read in place
        assert sorted(p.name for p in fetched.rglob("*") if p.is_file()) == ["latest", "mine.pt"]
        assert store.file_sizes("ckpt") == {
            "learner/mine.pt": 3000,
            "learner/theirs.pt": 5000,
            "latest": 7,
        }
        with pytest.raises(StorageError, match=r"downloading .*missing.* failed"):
            store.fetch("missing")


def test_user_info_and_secret_parameters_of_a_uri_are_masked_everywhere_shown():
    """Issue 33: `s3://KEY:SECRET@bucket/...` was shown and saved as given."""
    from eopd_ray.storage.run_storage import redacted, redacted_values

    assert redacted("s3://KEY:SECRET@bucket/run?scheme=http") == "s3://***@bucket/run?scheme=http"
    assert redacted("s3://KEY@bucket/a@b") == "s3://***@bucket/a@b"  # only the user info
    assert redacted("gs://b/x?access_key=A&secret_key=S&x=1") == (
        "gs://b/x?access_key=***&secret_key=***&x=1"
    )
    for plain in ("Qwen/Qwen3-1.7B@main", "/models/a@b", "s3://bucket/run#listing=abc"):
        assert redacted(plain) == plain
    # A pin after a secret parameter stays (a resume compares the pins of masked URIs).
    assert redacted("s3://b/m.gguf?x=1&secret_key=S#sha256=ab12") == (
        "s3://b/m.gguf?x=1&secret_key=***#sha256=ab12"
    )
    tree = {"run": {"output_dir": "s3://K:S@b/r"}, "eval": {"benchmarks": ["hdfs://u:p@nn/x", 3]}}
    assert redacted_values(tree) == {
        "run": {"output_dir": "s3://***@b/r"},
        "eval": {"benchmarks": ["hdfs://***@nn/x", 3]},
    }
    store = RunStorage("s3://KEY:SECRET@bucket/run?endpoint_override=127.0.0.1:9&scheme=http")
    assert store.show("metrics.jsonl") == (
        "s3://***@bucket/run/metrics.jsonl?endpoint_override=127.0.0.1:9&scheme=http"
    )


def test_a_forgotten_s3_endpoint_fails_before_ray_starts_and_says_how_to_give_one(
    tiny_pair, tmp_path, monkeypatch
):
    """Issue 33: reported ~30 s in, after Ray had started, with no word of endpoint_override or
    AWS_ENDPOINT_URL."""
    import ray

    from eopd_ray.config import load_config
    from eopd_ray.driver.pipeline import Pipeline

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    tiny = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"
    overrides = [
        f"model.student_path={tiny_pair[0]}",
        f"model.teacher_path={tiny_pair[1]}",
        "model.build_tiny=false",
        "run.output_dir=s3://eopd-no-such-endpoint/run",
    ]
    assert not ray.is_initialized()
    with pytest.raises(StorageError) as err:
        Pipeline(load_config(tiny, overrides))
    assert not ray.is_initialized()
    message = str(err.value)
    assert message.startswith("run.output_dir = 's3://eopd-no-such-endpoint/run': ")
    assert "?endpoint_override=host:port&scheme=http" in message and "AWS_ENDPOINT_URL" in message
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # given, but wrong: no hint
    with pytest.raises(StorageError) as err:
        RunStorage("s3://eopd-no-such-endpoint/run").check()
    assert "AWS_ENDPOINT_URL" not in str(err.value)
