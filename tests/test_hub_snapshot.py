"""eopd_ray/storage/hub_snapshot.py: a warm cache on a node without hub access and without
HF_HUB_OFFLINE=1 (issue 33): a pinned commit is used at once, an unpinned id falls back to the
cache with a warning that names HF_HUB_OFFLINE=1; a misspelt id gets the closest cached ids."""

from __future__ import annotations

import logging
import time

import pytest
from test_sources import add_to_hub_cache, commit

from eopd_ray.ports import free_port
from eopd_ray.storage.sources import SourceError, kind_of, local_model_dir, pin_model


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """A cache in the hub's layout, offline mode off, and a hub endpoint nothing listens on
    (what a node without hub access sees, minus the waiting for connect timeouts)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    port = free_port()  # closed again: connections are refused
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    return cache


def test_a_pinned_commit_in_the_cache_is_used_without_asking_the_hub(no_hub, tiny_pair):
    """Before: huggingface_hub listed the commit's files on the hub first, 5 retries (23 s with
    refused connections, minutes with connect timeouts), in every process, for every model."""
    sha = commit("v1")
    snapshot = add_to_hub_cache(no_hub, "tiny-org/student", tiny_pair[0], sha)
    started = time.monotonic()
    assert local_model_dir(f"tiny-org/student@{sha}") == str(snapshot)
    assert time.monotonic() - started < 3


def test_an_unpinned_id_without_the_hub_uses_the_cache_and_says_to_go_offline(
    no_hub, tiny_pair, caplog
):
    sha = commit("v1")
    add_to_hub_cache(no_hub, "tiny-org/student", tiny_pair[0], sha)
    with caplog.at_level(logging.WARNING):
        assert pin_model("tiny-org/student", "model.student_path") == f"tiny-org/student@{sha}"
    assert (
        "model.student_path = tiny-org/student: the Hugging Face hub did not answer" in caplog.text
    )
    assert "set HF_HUB_OFFLINE=1" in caplog.text


def test_an_id_neither_the_cache_nor_the_hub_knows_gets_the_closest_cached_ids(
    no_hub, tiny_pair, monkeypatch
):
    import huggingface_hub.constants

    add_to_hub_cache(no_hub, "tiny-org/student", tiny_pair[0], commit("v1"))
    add_to_hub_cache(no_hub, "other-org/teacher", tiny_pair[1], commit("t"))
    for offline in (False, True):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        with pytest.raises(SourceError) as err:
            local_model_dir("tiny-org/studnet", "model.student_path")
        assert "(did you mean 'tiny-org/student'? in the cache)" in str(err.value)
    with pytest.raises(SourceError) as err:
        local_model_dir("nothing/alike", "model.student_path")
    assert "did you mean" not in str(err.value)


def test_a_hub_id_with_a_trailing_slash_is_a_hub_id(no_hub, tiny_pair, tmp_path, monkeypatch):
    """Before: `org/name/` (a shell's completion) was taken for a local path."""
    monkeypatch.chdir(tmp_path)
    sha = commit("v1")
    add_to_hub_cache(no_hub, "tiny-org/student", tiny_pair[0], sha)
    assert kind_of("tiny-org/student/") == "hub"
    assert pin_model("tiny-org/student/") == f"tiny-org/student@{sha}"
    (tmp_path / "tiny-org" / "student").mkdir(parents=True)
    assert kind_of("tiny-org/student/") == "local"  # an existing directory still wins
