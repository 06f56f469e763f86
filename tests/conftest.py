"""Shared test setup: offline, single-threaded, tiny models built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
# The S3 tests talk to moto's server on a loopback port (tests/s3_endpoint.py). Set before any
# Ray starts, so its workers reach the endpoint with these dummy credentials too.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# Models fetched from object stores go to a scratch cache of this test session, not ~/.cache.
if "EOPD_CACHE" not in os.environ:
    import tempfile

    os.environ["EOPD_CACHE"] = tempfile.mkdtemp(prefix="eopd-cache-")

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(student_dir, teacher_dir): tiny Llama student, larger Qwen3 teacher, one tokenizer."""
    from eopd_ray.toy.models import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="module")
def s3():
    """A real S3 endpoint (moto's server on a loopback port) for the module's tests."""
    from s3_endpoint import S3Endpoint

    with S3Endpoint() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "object store", "s3"])
def store(request, tmp_path):
    """A run directory on a local disk, on pyarrow's in-memory object store (no rename) and on
    a real S3 endpoint; modules with other needs define their own."""
    import pyarrow.fs as pafs

    from eopd_ray.storage.run_storage import RunStorage

    if request.param == "s3":
        return RunStorage(request.getfixturevalue("s3").uri(f"runs/{tmp_path.name}"))
    if request.param == "local":
        return RunStorage(str(tmp_path / "run"))
    return RunStorage("bucket/run", filesystem=pafs._MockFileSystem())
