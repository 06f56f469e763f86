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
    [
        ("loss_memory.py", "peak_ratio"),
        ("ragged.py", "speedup_vs_fixed"),
        ("teacher_payload.py", "payload_bytes_per_token"),
        ("throughput.py", "ratio_to_compute_floor"),
        ("weight_sync.py", "ratio_to_floor"),
    ],
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
    rows = data.get("shapes") or data.get("rows") or data.get("configs") or data.get("sizes")
    assert rows
    for row in rows:
        values = [row[key]] if key in row else [t[key] for t in row["transports"].values()]
        assert values and all(v > 0 for v in values), row
    if script == "ragged.py":  # the three figures, per configuration
        assert {"padded_fraction", "speedup_vs_fixed", "rank_imbalance"} <= set(rows[0])


def test_gpu_check_runs_its_code_on_cpu_with_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["card"] == "cpu"
    assert data["learner_qwen3_1.7b"]["tokens_per_s"] > 0
    assert data["teacher_qwen3_8b"]["response_tokens_per_s"] > 0
    assert [r["path"] for r in data["loss_kernel"]] == ["plain", "lean"]


def test_reproduction_table_reports_mean_and_sample_std():
    sys.path.insert(0, str(BENCH))
    from toy_reproduction import TABLE_KEYS, markdown_table, mean_std

    mean, std = mean_std([1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0)  # sample std (n - 1)
    assert mean_std([5.0]) == (5.0, 0.0)
    stats = {k: (0.5, 0.25) for k, _ in TABLE_KEYS}
    table = markdown_table({"eopd": stats}, seeds=3)
    assert "n=3 seeds" in table and "| eopd | 0.500 ± 0.250 |" in table
