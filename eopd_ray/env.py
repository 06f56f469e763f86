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


# CPU flags of native bf16 matrix arithmetic (AVX-512 BF16 dot products, AMX tiles).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this machine's CPU multiplies bf16 natively; None where /proc/cpuinfo is absent."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):  # x86; other CPUs name their features differently
            flags.update(line.split(":", 1)[1].split())
    if not flags:
        return None
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def slow_bf16_warning(dtype: str, cpu_roles: list[str], native: bool | None) -> str | None:
    """What to tell the operator when bf16 roles run on a CPU without native bf16: there torch
    emulates it, several times slower than fp32 (with it, bf16 matmuls ran 4.9x fp32's rate on
    this project's 2-core AVX-512 BF16 machine)."""
    if dtype != "bfloat16" or not cpu_roles or native is not False:
        return None
    return (
        f"model.dtype is bfloat16 and {', '.join(cpu_roles)} run on CPU, but this CPU has none of "
        f"{', '.join(NATIVE_BF16_FLAGS)}: bf16 is emulated there and slower than float32. Set "
        "model.dtype=float32 unless the workers' nodes differ from this one."
    )
