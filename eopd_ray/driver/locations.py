"""Where relative paths in a config point, so that a submitted job's outputs outlive it.

`ray job submit --working-dir .` runs the driver in a copy of the repository under Ray's
temporary directory (`.../runtime_resources/working_dir_files/...`), deleted when the head
restarts, and without the git-ignored `runs/` folder. There, a relative `run.output_dir` would
vanish with the copy, and models the job builds itself (`model.build_*`) would be rebuilt by
every job. So relative paths of what a run *writes* resolve against a durable workspace:

    $EOPD_RAY_HOME                   when set (any job, any machine)
    ~/eopd-ray                       inside a Ray job's working-dir copy
    the current directory            otherwise (a clone: `make run`, `python jobs/distill.py`)

Paths the run only reads (a prompt file in the repository, a model directory) stay relative to
the current directory, which is the uploaded copy inside a job. URIs (`s3://...`) and absolute
paths are left alone. Imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from eopd_ray.config import Config, ConfigError, ModelConfig
from eopd_ray.env import JOB_CONFIG_ENV
from eopd_ray.errors import ConfigIssue
from eopd_ray.storage.run_storage import is_uri, redacted
from eopd_ray.storage.sources import kind_of

log = logging.getLogger(__name__)

HOME_ENV = "EOPD_RAY_HOME"
BUILDERS = ("build_tiny", "build_rehearsal", "build_toy")


def in_job_working_dir(cwd: Path | None = None) -> bool:
    """True inside the copy Ray makes of a job's `--working-dir`."""
    parts = (cwd or Path.cwd()).resolve().parts
    return "runtime_resources" in parts and "working_dir_files" in parts


def job_without_working_dir(cwd: Path | None = None) -> str | None:
    """A warning when this process is a job's entrypoint submitted without `--working-dir`:
    it then runs in whatever directory the head was started in (possibly another checkout, so
    other code and configs) and writes its relative outputs there. None otherwise."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = (json.loads(raw).get("runtime_env") or {}) if raw else {}
    except ValueError:
        return None
    if runtime_env.get("working_dir") or in_job_working_dir(cwd):
        return None
    where = (cwd or Path.cwd()).resolve()
    return (
        f"this job was submitted without --working-dir: it runs the code and configs in {where} "
        "(the directory the Ray head was started in), not those of the checkout you submitted "
        "from. Submit with `ray job submit --working-dir . -- python jobs/distill.py ...`"
    )


def workspace_root() -> Path:
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().resolve()
    if in_job_working_dir():
        return Path("~/eopd-ray").expanduser().resolve()
    return Path.cwd().resolve()


def _durable(path: str, root: Path) -> str:
    if not path or is_uri(path) or os.path.isabs(path):
        return path
    return str(root / path)


def refuse_hub_ids_to_build(m: ModelConfig) -> None:
    """A builder (`model.build_*`) makes models in local directories: a hub id or a URI given
    with one would become a local directory of that name holding random models, silently."""
    builder = next((b for b in BUILDERS if getattr(m, b)), None)
    issues = []
    for name in ("student_path", "teacher_path"):
        spec = getattr(m, name)
        kind = kind_of(spec) if builder else "local"
        if kind != "local":
            what = {"hub": "a hub id", "uri": "a URI", "gguf": "a GGUF file"}[kind]
            issues.append(
                ConfigIssue(
                    f"model.{builder}",
                    f"model.{name} = {redacted(spec)!r} is {what}, but model.{builder}=true "
                    "builds models of its own in local directories (it would build random ones "
                    f"in a directory of that name): set model.{builder}=false to load it, or "
                    "give a local directory to build in (`./org/name` for a relative one)",
                )
            )
    if issues:
        raise ConfigError(issues)


def resolve_locations(cfg: Config) -> Config:
    """`cfg` with `run.output_dir` (and the model/prompt paths the job builds itself) made
    absolute under the workspace root; says so when that moved them out of a job's copy.
    Refuses a hub id or URI with a `model.build_*` builder (`refuse_hub_ids_to_build`)."""
    root = workspace_root()
    m, d, run = cfg.model, cfg.data, cfg.run
    refuse_hub_ids_to_build(m)
    built = m.build_tiny or m.build_rehearsal or m.build_toy
    model = dataclasses.replace(
        m,
        student_path=_durable(m.student_path, root) if built else m.student_path,
        teacher_path=_durable(m.teacher_path, root) if built else m.teacher_path,
    )
    data = d
    if (m.build_rehearsal or m.build_toy) and d.train_path:
        data = dataclasses.replace(d, train_path=_durable(d.train_path, root))
    output_dir = _durable(run.output_dir, root)
    if output_dir != run.output_dir and in_job_working_dir():
        log.warning(
            "run.output_dir %r is relative and this job runs in Ray's temporary copy of its "
            "working dir: writing to %s instead (set %s, or an absolute run.output_dir or a URI "
            "such as s3://bucket/run, to choose)",
            run.output_dir,
            output_dir,
            HOME_ENV,
        )
    return dataclasses.replace(
        cfg, model=model, data=data, run=dataclasses.replace(run, output_dir=output_dir)
    )
