"""The step timeline: busy seconds per worker and role, the JSON it is kept in, its picture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eopd_ray.evaluation.plots import plot_timeline
from eopd_ray.telemetry.timeline import Timeline, role_metrics

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def timeline() -> Timeline:
    t = Timeline(step=3, mode="streamed", started=100.0)
    t.add("rollout-0", "generate", 100.0, 104.0)
    t.add("rollout-0", "generate", 103.0, 106.0)  # overlaps: counted once
    t.add("rollout-1", "generate", 100.0, 102.0)
    t.add("teacher-0", "score", 101.0, 102.0)
    t.add("teacher-0", "score", 105.0, 107.0)
    t.add_role("learner", 2, "train", 107.0, 109.0)
    t.add_role("rollout", 2, "sync", 109.0, 110.0)
    t.add_role("learner", 2, "sync", 109.0, 110.0)
    return t


def test_busy_seconds_count_overlapping_intervals_once():
    t = timeline()
    assert t.busy_s("rollout-0") == pytest.approx(7.0)  # 100-106, then the sync 109-110
    assert t.busy_s("rollout-1") == pytest.approx(3.0)
    assert t.workers("learner") == ["learner-0", "learner-1"]
    metrics = role_metrics(t, step_s=10.0)
    assert metrics["roles/rollout_busy_s"] == pytest.approx(5.0)  # mean of 7 and 3
    assert metrics["roles/rollout_wait_s"] == pytest.approx(5.0)
    assert metrics["roles/teacher_busy_s"] == pytest.approx(3.0)
    assert metrics["roles/learner_busy_s"] == pytest.approx(3.0)
    assert metrics["roles/slowest_s"] == pytest.approx(5.0)
    assert metrics["roles/step_over_slowest"] == pytest.approx(2.0)


def test_timeline_round_trips_through_json_and_is_drawn(tmp_path):
    t = timeline()
    again = Timeline.from_json(t.to_json())
    assert again.intervals == t.intervals and again.mode == "streamed" and again.step == 3
    path = plot_timeline(again, tmp_path / "plots" / "timeline.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_plot_metrics_draws_the_runs_timeline(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "time/step_s": 1.0}\n')
    (tmp_path / "timeline.json").write_text(timeline().to_json())
    proc = subprocess.run(
        [sys.executable, str(JOBS / "plot_metrics.py"), str(tmp_path / "metrics.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "plots" / "timeline.png").exists()
