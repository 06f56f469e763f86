"""Where a submitted job runs and writes (eopd_ray/driver/locations.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eopd_ray.config import ConfigError, load_config
from eopd_ray.driver.locations import job_without_working_dir, resolve_locations
from eopd_ray.env import JOB_CONFIG_ENV

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def test_a_job_without_working_dir_is_warned_about_naming_its_directory(monkeypatch, tmp_path):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert job_without_working_dir(tmp_path) is None  # not a submitted job: `python jobs/...`
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}, "metadata": {}}))
    warning = job_without_working_dir(tmp_path)
    assert str(tmp_path) in warning and "--working-dir" in warning
    with_dir = {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(with_dir))
    assert job_without_working_dir(tmp_path) is None
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}, "metadata": {}}))
    assert job_without_working_dir(copy) is None  # inside the uploaded copy


def test_a_hub_id_or_uri_with_a_model_builder_is_refused_naming_the_key(monkeypatch, tmp_path):
    """Issue 33: tiny.yaml with model.student_path=org/name built random tiny models in ./org/name
    and trained them, silently. Now each builder refuses a hub id, a URI or a GGUF file and says
    to set it false; a hub-shaped directory that exists is a directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EOPD_RAY_HOME", raising=False)
    tiny, rehearsal = CONFIGS / "tiny.yaml", CONFIGS / "rehearsal.yaml"
    cases = [
        (tiny, ["model.student_path=HuggingFaceTB/SmolLM2-135M"], "build_tiny", ["student_path"]),
        (
            tiny,
            ["model.student_path=org/s@abc123", "model.teacher_path=s3://KEY:SECRET@bucket/t"],
            "build_tiny",
            ["student_path", "teacher_path"],
        ),
        (rehearsal, ["model.teacher_path=Qwen/Qwen3-0.6B"], "build_rehearsal", ["teacher_path"]),
    ]
    for config, overrides, builder, keys in cases:
        with pytest.raises(ConfigError) as caught:
            resolve_locations(load_config(config, overrides))
        message = str(caught.value)
        assert f"set model.{builder}=false to load it" in message, message
        assert [i.path for i in caught.value.issues] == [f"model.{builder}"] * len(keys)
        assert all(f"model.{key} = " in message for key in keys), message
        assert "SECRET" not in message  # a URI's credentials are masked
    assert not (tmp_path / "HuggingFaceTB").exists() and not (tmp_path / "org").exists()

    # Switched off, the ids are loaded (pinned later by the driver); nothing is built.
    off = load_config(tiny, ["model.student_path=org/s", "model.build_tiny=false"])
    assert resolve_locations(off).model.student_path == "org/s"
    # A directory of that shape that exists is a directory: built in (or reused) as before.
    (tmp_path / "models" / "student").mkdir(parents=True)
    here = resolve_locations(load_config(tiny, ["model.student_path=models/student"]))
    assert here.model.student_path == str(tmp_path / "models" / "student")


def test_toy_yaml_with_hub_ids_names_model_build_toy():
    overrides = ["model.student_path=org/student", "model.teacher_path=org/teacher"]
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIGS / "toy.yaml", overrides)
    assert "set model.build_toy=false" in str(caught.value)
