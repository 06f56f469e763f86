"""Environment defaults for the jobs, set before anything imports Ray, vLLM or transformers."""

from __future__ import annotations

import os

JOB_ENV = {
    # An embedded local Ray then listens on 127.0.0.1 only (Ray 2.60 reads it at import).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # On a busy few-core box more threads were 5-30x slower.
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "VLLM_NO_USAGE_STATS": "1",
}

# What Ray's job supervisor hands a submitted job's entrypoint: its runtime env and metadata.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_submitted_job() -> bool:
    """Whether this process is the entrypoint of a `ray job submit` job."""
    return bool(os.environ.get(JOB_CONFIG_ENV))


def set_job_environment(**extra: str) -> None:
    """Apply the defaults (and `extra`) without overriding what the user already set."""
    for key, value in {**JOB_ENV, **extra}.items():
        os.environ.setdefault(key, value)
