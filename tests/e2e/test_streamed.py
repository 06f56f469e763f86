"""The streamed step (rollout.stream: true) against the synchronous reference, on a real local
Ray: the same rows trained in the same order, with a rollout worker and a teacher killed by pid
while their groups are in flight."""

from __future__ import annotations

import json
import os
import signal

import pytest

from eopd_ray.config import load_config
from eopd_ray.driver import streamed
from eopd_ray.driver.pipeline import Pipeline
from eopd_ray.telemetry.timeline import Timeline

from .conftest import TINY, tiny_overrides

pytestmark = pytest.mark.slow

# Ragged responses (some stop at EOS, the longest decides the rollout), several groups per
# worker, ZeRO-3 with one sequence per micro-batch (placeholder forwards for pi_old), 2 teachers.
RAGGED = [
    "run.steps=2",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=160",
    "rollout.max_model_len=256",
    "rollout.stream_group_tokens=64",
    "teacher.num_workers=2",
    "learner.zero_stage=3",
    "learner.mini_batch_size=8",
    "learner.micro_batch_size=1",
    "run.worker_timeout_s=8",
]

# Time, throughput and the stream's own counters differ between the modes by nature.
_TIMING = ("time/", "roles/", "stream/")


def _trained(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(_TIMING) and "per_s" not in k}


def _run(cfg, kills: dict | None = None) -> tuple[Pipeline, list[dict]]:
    """Run `cfg`; `kills` = {"rollout": step, "teacher": step}: SIGKILL rollout-0 once its
    first group of that step has arrived (the rest still decoding); SIGSTOP teacher-0 as soon
    as a group of that step is queued on it (hung, not dead: its heartbeat finds it)."""
    pipeline = Pipeline(cfg)
    kills, done = dict(kills or {}), set()
    next_group, send = streamed.StepStream._next_group, streamed.StepStream._send_to_teacher

    def kill(role: str, sig: int) -> None:
        done.add(role)
        os.kill(getattr(pipeline, role).identities[0].pid, sig)

    def next_group_then_kill(self, gen):
        rank = self.streams[gen]
        next_group(self, gen)
        if kills.get("rollout") == self.step and rank == 0 and "rollout" not in done:
            assert self.remaining[0], "rollout-0 handed out all its rows in its first group"
            kill("rollout", signal.SIGKILL)

    def send_then_kill(self, gid):
        send(self, gid)
        if kills.get("teacher") == self.step and "teacher" not in done:
            kill("teacher", signal.SIGSTOP)

    streamed.StepStream._next_group = next_group_then_kill
    streamed.StepStream._send_to_teacher = send_then_kill
    try:
        pipeline.start()
        return pipeline, pipeline.run(progress="lines")
    finally:
        streamed.StepStream._next_group, streamed.StepStream._send_to_teacher = next_group, send
        pipeline.shutdown()


def test_streamed_step_trains_what_the_sync_step_trains_through_worker_loss(
    local_ray, tiny_pair, tmp_path
):
    sync_cfg = load_config(
        TINY, tiny_overrides(tiny_pair, tmp_path / "sync", *RAGGED, "rollout.stream=false")
    )
    cfg = load_config(TINY, tiny_overrides(tiny_pair, tmp_path / "streamed", *RAGGED))
    assert cfg.rollout.stream and not sync_cfg.rollout.stream
    _, reference = _run(sync_cfg)
    pipeline, rows = _run(cfg, kills={"rollout": 0, "teacher": 1})

    # The same samples, scores, pi_old and updates: every non-time metric agrees (fp32; only
    # the summation order of the per-group forwards differs).
    for ref, got in zip(reference, rows, strict=True):
        ref, got = _trained(ref), _trained(got)
        assert ref.keys() == got.keys()
        differ = {
            k: (ref[k], got[k]) for k in ref if abs(ref[k] - got[k]) > 1e-4 * max(1, abs(ref[k]))
        }
        assert not differ, differ
    # Step 0: rollout-0 died mid-stream; only its rows not yet handed out were generated again.
    rollout_rows = cfg.rollout.prompts_per_step // 2 * cfg.rollout.samples_per_prompt
    assert 0 < rows[0]["stream/rows_redone"] < rollout_rows
    # Step 1: teacher-0 hung with groups queued on it: killed after run.worker_timeout_s, and
    # its groups scored again, once.
    assert rows[1]["stream/groups_rescored"] >= 1 and rows[1]["stream/rows_redone"] == 0
    assert pipeline.num_recoveries == 2
    assert all(r["stream/groups"] > cfg.rollout.num_workers for r in rows)
    # pi_old came per group, as the groups arrived.
    assert all(r["learner/old_logprobs_overlapped"] == 1.0 for r in rows)

    # Where the time went: every role's busy and waiting seconds, and the step's timeline.
    for row in rows:
        for role in ("rollout", "teacher", "learner"):
            busy, wait = row[f"roles/{role}_busy_s"], row[f"roles/{role}_wait_s"]
            assert busy > 0 and busy + wait == pytest.approx(row["time/step_s"], rel=0.05)
        assert row["roles/step_over_slowest"] >= 0.95
    timeline = Timeline.from_json((tmp_path / "streamed" / "timeline.json").read_text())
    assert timeline.step == 1 and timeline.mode == "streamed"
    stages = {(w.split("-")[0], stage) for w, stage, *_ in timeline.intervals}
    assert {("rollout", "generate"), ("teacher", "score"), ("learner", "pi_old")} <= stages
    assert {("learner", "train"), ("rollout", "sync")} <= stages
    assert json.loads((tmp_path / "sync" / "timeline.json").read_text())["mode"] == "sync"
