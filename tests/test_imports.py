"""The pure core imports neither Ray, vLLM nor DeepSpeed (architecture's import rule)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "eopd_ray"


def modules_in(package: str) -> list[str]:
    """Every module of eopd_ray/<package>, dotted."""
    return sorted(
        "eopd_ray." + p.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        for p in (PACKAGE / package).glob("*.py")
        if p.name != "__init__.py"
    )


# The core and the config (tests/test_layers.py reads their source for the same rule), plus
# the run-storage, metrics and evaluation modules a CPU-only analysis script may use.
PURE = [
    "eopd_ray.errors",
    "eopd_ray.env",
    "eopd_ray.building",
    *modules_in("config"),
    *modules_in("core"),
    *modules_in("storage"),
    *modules_in("evaluation"),
    "eopd_ray.telemetry.step_metrics",
    "eopd_ray.roles.weight_sync",
    "eopd_ray.toy.models",
]


def imported_by(modules: list[str], heavy: set[str]) -> str:
    """Which of `heavy` importing `modules` pulls in, in a fresh interpreter."""
    code = (
        "import sys\n"
        f"for m in {modules!r}: __import__(m)\n"
        f"heavy = set({sorted(heavy)!r})\n"
        "print(','.join(sorted({n.split('.')[0] for n in sys.modules} & heavy)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_pure_core_does_not_import_heavy_engines():
    pulled = imported_by(PURE, {"ray", "vllm", "deepspeed"})
    assert pulled == "", f"pure modules pulled in: {pulled}"


# What the GPU check (jobs/bench/gpu_check.py) runs on a machine with torch, transformers and
# DeepSpeed but no Ray or vLLM: the teacher and learner workers themselves.
WORKERS = [
    "eopd_ray.roles.teacher",
    "eopd_ray.roles.learner",
    "eopd_ray.roles.learner_engine",
    "eopd_ray.roles.learner_weights",
    "eopd_ray.telemetry.ray_gauges",
]


def test_teacher_and_learner_workers_import_without_ray_or_vllm():
    pulled = imported_by(WORKERS, {"ray", "vllm"})
    assert pulled == "", f"worker modules pulled in: {pulled}"
