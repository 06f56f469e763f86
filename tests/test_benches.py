"""The benchmarks still run (quick mode) and their JSON carries the documented keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "jobs" / "bench"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "script, key",
    [("loss_memory.py", "peak_ratio"), ("teacher_payload.py", "payload_bytes_per_token")],
)
def test_bench_quick_mode_writes_its_json(script, key, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data.get("shapes") or data.get("rows")
    assert rows and all(key in r for r in rows)
