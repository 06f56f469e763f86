"""eopd_ray.storage.sources: hub ids through a Hugging Face cache the test builds in the hub's own
layout (the test machines reach no hub), and object-store URIs through a real S3 endpoint
(moto's server): downloaded once per node, never used partial or outdated, and pinned."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from transformers import AutoConfig

from eopd_ray.config import config_from_dict
from eopd_ray.storage import object_source
from eopd_ray.storage.sources import (
    SourceError,
    kind_of,
    local_file,
    local_model_dir,
    pin_model,
    pin_models,
    with_local_models,
    with_local_paths,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def commit(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()  # 40 hex digits, as a git commit


def add_to_hub_cache(cache: Path, repo: str, model_dir: Path, sha: str, ref: str | None = "main"):
    """`model_dir` as revision `sha` of `repo` in a hub cache (models--org--name/snapshots/...)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, root / "snapshots" / sha)
    if ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    return root / "snapshots" / sha


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    cache = tmp_path / "eopd-cache"
    monkeypatch.setenv("EOPD_CACHE", str(cache))
    return cache


def test_kinds(tmp_path):
    local = tmp_path / "org"
    (local / "model").mkdir(parents=True)
    assert kind_of("Qwen/Qwen3-1.7B-Base") == "hub"
    assert kind_of("Qwen/Qwen3-1.7B-Base@main") == "hub"
    assert kind_of(f"Qwen/Qwen3-1.7B-Base@{commit('x')}") == "hub"
    assert kind_of("s3://bucket/models/student?endpoint_override=h:1&scheme=http") == "uri"
    assert kind_of("gs://bucket/m") == "uri"
    assert kind_of("runs/toy/prepared/current/student") == "local"  # two slashes: a path
    assert kind_of("/abs/student") == "local"
    assert kind_of("./org/model") == "local"
    os.chdir(tmp_path)
    assert kind_of("org/model") == "local"  # an existing directory wins over a hub id


def test_a_hub_id_is_pinned_and_loads_from_the_cache(hub_cache, tiny_pair):
    student, _ = tiny_pair
    sha = commit("v1")
    snapshot = add_to_hub_cache(hub_cache, "tiny-org/student", student, sha)
    assert pin_model("tiny-org/student") == f"tiny-org/student@{sha}"
    assert local_model_dir("tiny-org/student") == str(snapshot)
    assert local_model_dir(f"tiny-org/student@{sha}") == str(snapshot)
    assert AutoConfig.from_pretrained(local_model_dir("tiny-org/student")).vocab_size > 0


def test_a_resumed_run_keeps_its_pinned_commit(hub_cache, tiny_pair):
    student, teacher = tiny_pair
    old, new = commit("v1"), commit("v2")
    add_to_hub_cache(hub_cache, "tiny-org/student", student, old, ref=None)
    add_to_hub_cache(hub_cache, "tiny-org/student", student, new)  # main moved on since
    add_to_hub_cache(hub_cache, "tiny-org/teacher", teacher, commit("t"))
    given = {
        "model": {"student_path": "tiny-org/student", "teacher_path": "tiny-org/teacher"},
        "data": {"toy_prompts": 4},
    }
    cfg = config_from_dict(given)
    fresh = pin_models(cfg)
    assert fresh.model.student_path == f"tiny-org/student@{new}"
    assert fresh.model.teacher_path == f"tiny-org/teacher@{commit('t')}"
    resumed_from = config_from_dict(given, [f"model.student_path=tiny-org/student@{old}"])
    resumed = pin_models(cfg, lambda: resumed_from)
    assert resumed.model.student_path == f"tiny-org/student@{old}"
    # A revision the user gives wins over the resumed run's.
    explicit = config_from_dict(given, [f"model.student_path=tiny-org/student@{new}"])
    assert pin_models(explicit, lambda: resumed_from).model.student_path.endswith(new)


def test_a_hub_id_missing_offline_says_how_to_get_it(hub_cache):
    with pytest.raises(SourceError) as err:
        local_model_dir("tiny-org/absent@v2", "model.teacher_path")
    message = str(err.value)
    assert "model.teacher_path = 'tiny-org/absent@v2'" in message
    assert str(hub_cache) in message
    assert "HF_HUB_OFFLINE" in message
    assert "hf download tiny-org/absent --revision v2" in message


# ----------------------------------------------------------------------------- object stores


def test_a_model_on_s3_is_downloaded_once_and_loads(s3, node_cache, tiny_pair, caplog):
    student, _ = tiny_pair
    uri = s3.upload_dir(student, "models/once/student")
    caplog.set_level("INFO", logger="eopd_ray.storage.object_source")
    first = local_model_dir(uri, "model.student_path")
    assert Path(first).is_relative_to(node_cache)
    assert AutoConfig.from_pretrained(first).vocab_size > 0
    again = local_model_dir(uri, "model.student_path")
    assert again == first
    downloads = [r for r in caplog.records if "downloaded" in r.getMessage()]
    assert len(downloads) == 1, [r.getMessage() for r in downloads]


def test_a_changed_object_is_downloaded_again(s3, node_cache):
    uri = s3.put_bytes("data/changing.jsonl", b'{"problem": "1+1", "answer": "2"}\n')
    first = Path(local_file(uri, "eval.benchmarks"))
    assert first.name == "changing.jsonl"
    s3.put_bytes("data/changing.jsonl", b'{"problem": "2+2", "answer": "4"}\n' * 2)
    again = Path(local_file(uri, "eval.benchmarks"))
    assert again.read_bytes().count(b"2+2") == 2


def test_an_interrupted_download_leaves_nothing_used(s3, node_cache, tiny_pair, monkeypatch):
    student, _ = tiny_pair
    uri = s3.upload_dir(student, "models/interrupted/student")
    real_copy, copied = pafs.copy_files, []

    def copy_then_fail(src, dst, **kw):
        if copied:
            raise OSError("connection reset by peer")
        copied.append(src)
        return real_copy(src, dst, **kw)

    monkeypatch.setattr(object_source.pafs, "copy_files", copy_then_fail)
    with pytest.raises(SourceError, match=r"download to .* failed .*connection reset"):
        local_model_dir(uri, "model.student_path")
    objects = node_cache / "objects"
    assert [p.name for p in objects.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(object_source.pafs, "copy_files", real_copy)
    assert AutoConfig.from_pretrained(local_model_dir(uri, "model.student_path"))


def test_a_truncated_copy_in_the_cache_is_not_used(s3, node_cache, tiny_pair):
    student, _ = tiny_pair
    uri = s3.upload_dir(student, "models/truncated/student")
    local = Path(local_model_dir(uri))
    weights = next(local.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a disk filled up, a killed copy
    assert Path(local_model_dir(uri)) == local
    assert weights.stat().st_size > 100
    assert AutoConfig.from_pretrained(str(local))


def test_workers_on_one_node_download_once(s3, node_cache, tiny_pair):
    """Two processes resolve the same URI at once: one downloads, the other waits and reuses."""
    student, _ = tiny_pair
    uri = s3.upload_dir(student, "models/shared/student")
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from eopd_ray.storage.sources import local_model_dir\n"
        f"print('dir', local_model_dir({uri!r}, 'model.student_path'))\n"
    )
    env = {**os.environ, "EOPD_CACHE": str(node_cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    dirs = {line for out in outputs for line in out.splitlines() if line.startswith("dir ")}
    assert len(dirs) == 1
    assert sum(out.count("downloaded") for out in outputs) == 1, outputs


def test_missing_object_and_secrets_in_messages(s3, node_cache):
    with pytest.raises(SourceError, match="nothing there"):
        local_model_dir(s3.uri("models/absent"), "model.student_path")
    # pyarrow takes no credentials in a URI; a message never repeats one all the same.
    secret_uri = s3.uri("models/absent") + "&secret_key=hunter2"
    with pytest.raises(SourceError) as err:
        local_model_dir(secret_uri, "model.student_path")
    assert "hunter2" not in str(err.value) and "secret_key=***" in str(err.value)


def test_the_driver_localizes_models_prompts_and_benchmarks(s3, node_cache, tiny_pair):
    student, teacher = tiny_pair
    prompts = s3.put_bytes("data/train.jsonl", b'{"prompt": "What is 1+1?"}\n')
    bench = s3.put_bytes("data/tiny_bench.jsonl", b'{"problem": "1+1", "answer": "2"}\n')
    cfg = config_from_dict(
        {
            "model": {
                "student_path": s3.upload_dir(student, "models/driver/student"),
                "teacher_path": str(teacher),
            },
            "data": {"train_path": prompts},
            "eval": {"benchmarks": [bench]},
        }
    )
    local = with_local_paths(cfg)
    assert Path(local.model.student_path).is_relative_to(node_cache)
    assert local.model.teacher_path == str(teacher)
    assert Path(local.data.train_path).read_text().startswith('{"prompt"')
    assert Path(local.eval.benchmarks[0]).name == "tiny_bench.jsonl"
    pinned = pin_models(cfg)  # a URI is pinned to its listing, a local path left as it is
    assert pinned.model.student_path.startswith(cfg.model.student_path + "#listing=")
    assert pinned.model.teacher_path == str(teacher)


def test_the_driver_pins_hub_ids_before_any_worker_starts(hub_cache, tiny_pair, tmp_path):
    """Pipeline() (no Ray yet): the config every worker and config.yaml get names the commit."""
    from eopd_ray.driver.pipeline import Pipeline

    student, teacher = tiny_pair
    add_to_hub_cache(hub_cache, "tiny-org/student", student, commit("s"))
    add_to_hub_cache(hub_cache, "tiny-org/teacher", teacher, commit("t"))
    cfg = config_from_dict(
        {
            "model": {"student_path": "tiny-org/student", "teacher_path": "tiny-org/teacher"},
            "data": {"toy_prompts": 8, "max_prompt_tokens": 64},
            "rollout": {"max_model_len": 128, "max_new_tokens": 16},
            "run": {"output_dir": str(tmp_path / "run"), "steps": 1},
        }
    )
    pipeline = Pipeline(cfg)
    assert pipeline.cfg.model.student_path == f"tiny-org/student@{commit('s')}"
    assert pipeline.cfg.model.teacher_path == f"tiny-org/teacher@{commit('t')}"
    assert len(pipeline.prompts) == 8  # tokenized with the cached student's tokenizer


def test_a_model_uri_is_pinned_and_a_later_worker_refuses_other_objects(
    s3, node_cache, tiny_pair, tmp_path, monkeypatch
):
    """Issue 31 finding 7: a worker started later (a restart, a new node) loaded whatever the
    URI held then, e.g. a teacher replaced mid-run."""
    student, teacher = tiny_pair
    uri = s3.upload_dir(teacher, "models/pinned/teacher")
    cfg = config_from_dict(
        {"model": {"student_path": str(student), "teacher_path": uri}, "data": {"toy_prompts": 4}}
    )
    pinned = pin_models(cfg)
    spec = pinned.model.teacher_path
    assert spec.startswith(uri + "#listing=") and pinned.model.student_path == str(student)
    assert pin_models(pinned) == pinned  # a pinned URI whose objects are unchanged stays
    loaded = with_local_models(pinned).model.teacher_path
    assert AutoConfig.from_pretrained(loaded).vocab_size > 0
    s3.put_bytes("models/pinned/teacher/config.json", b'{"replaced": true}')
    # The node holding the pinned copy loads it; a new node refuses the replaced objects.
    assert with_local_models(pinned).model.teacher_path == loaded
    monkeypatch.setenv("EOPD_CACHE", str(tmp_path / "a-new-node"))
    with pytest.raises(SourceError) as err:
        with_local_models(pinned)
    message = str(err.value)
    assert "model.teacher_path = " in message and "changed since the run pinned them" in message
    assert spec.rsplit("=", 1)[1] in message and "run.allow_config_change" in message
    with pytest.raises(SourceError, match="changed since the run pinned them"):
        pin_models(pinned)  # a pin given explicitly is checked too
    repinned = pin_models(cfg).model.teacher_path  # unpinned: the objects there now
    assert repinned.startswith(uri + "#listing=") and repinned != spec
