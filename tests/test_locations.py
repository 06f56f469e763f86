"""Where a submitted job runs and writes (eopd_ray/driver/locations.py)."""

from __future__ import annotations

import json

from eopd_ray.driver.locations import job_without_working_dir
from eopd_ray.env import JOB_CONFIG_ENV


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
