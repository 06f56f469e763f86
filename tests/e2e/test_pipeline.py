"""The whole pipeline on a real local Ray: vLLM rollout, DeepSpeed (2 ranks), real weight sync;
the streamed step against the synchronous one."""

from __future__ import annotations

import dataclasses
import os
import re
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from eopd_ray.config import load_config
from eopd_ray.driver import streamed
from eopd_ray.driver.pipeline import Pipeline
from eopd_ray.roles.rollout_engines import Sampling
from eopd_ray.telemetry.ray_gauges import metric_name
from eopd_ray.telemetry.step_metrics import read_jsonl
from eopd_ray.telemetry.timeline import Timeline

from .conftest import REPO, TINY, sharpened_copy, sync_step_data, tiny_overrides

pytestmark = pytest.mark.slow

METHOD_METRICS = {
    "loss/opd",
    "loss/fkl",
    "loss/total",
    "opd/clip_frac",
    "opd/approx_kl",
    "kl/reverse_sampled",
    "gate/frac",
    "gate/teacher_entropy_mean",
    "fkl/on_gated",
    "student/entropy_mean",
    "student/frac_high_entropy",
    "topk/teacher_mass",
    "topk/student_mass",
    "rollout/response_len_mean",
    "rollout/tokens_per_s",
    "rollout/version_lag",
    "time/rollout_s",
    "time/teacher_s",
    "time/train_s",
    "time/sync_s",
}


def run(cfg) -> tuple[Pipeline, list[dict]]:
    pipeline = Pipeline(cfg)
    try:
        pipeline.start()
        return pipeline, pipeline.run(progress="lines")
    finally:
        pipeline.shutdown()


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
    "rollout.temperature=0.7",
    "learner.mini_batch_size=8",
    "learner.micro_batch_size=1",
    "run.worker_timeout_s=8",
]


def _run(cfg, kills: dict) -> tuple[Pipeline, list[dict], dict]:
    """Run `cfg` (streamed); before each step its data is also made the synchronous way from
    the same prompts (`sync_step_data`), and the streamed step's data is kept: returns the
    pipeline, the metrics, and {step: (sync data, streamed data)}. `kills` = {"rollout": step,
    "teacher": step}: SIGKILL rollout-0 once its first group of that step has arrived (the rest
    still decoding); SIGSTOP teacher-0 as soon as a group of that step is queued on it (hung,
    not dead: its heartbeat finds it)."""
    pipeline = Pipeline(cfg)
    done, data = set(), {}
    next_group, send = streamed.StepStream._next_group, streamed.StepStream._send_to_teacher
    step, streamed_data = pipeline.step, None  # the rollouts part's, once start() made it

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

    def step_both_ways(n):
        before = pipeline.state.stream.state_dict()
        data[n] = [sync_step_data(pipeline, n)]
        pipeline.state.stream.load_state_dict(before)  # the streamed step: the same prompts
        return step(n)

    def keeping_streamed_data(n, pending, timeline):
        result = streamed_data(n, pending, timeline)
        data[n].append(result)
        return result

    pipeline.step = step_both_ways
    streamed.StepStream._next_group = next_group_then_kill
    streamed.StepStream._send_to_teacher = send_then_kill
    try:
        pipeline.start()
        streamed_data = pipeline.rollouts.streamed
        pipeline.rollouts.streamed = keeping_streamed_data
        return pipeline, pipeline.run(progress="lines"), data
    finally:
        streamed.StepStream._next_group, streamed.StepStream._send_to_teacher = next_group, send
        pipeline.shutdown()


# ZeRO-2 at temperature 1 (tiny.yaml as shipped) runs in every other e2e test of this package.
def test_streamed_step_trains_what_the_sync_step_trains_through_worker_loss(
    local_ray, tiny_pair, tmp_path
):
    """The streamed step (rollout.stream: true, the default) against the synchronous hand-off of
    the same prompts with the same weights, at every step: the same rows in the same order, the
    same teacher scores and pi_old up to the summation order of per-group forwards (fp32), so
    the same update (ZeRO-3, tempered, ragged lengths, 2 teachers), with rollout-0 killed by pid
    and teacher-0 stopped while their groups are in flight; and what every run writes: the
    method's metrics, the resolved config, TensorBoard events, the series the Grafana dashboard
    plots."""
    out = tmp_path / "streamed"
    cfg = load_config(TINY, tiny_overrides(tiny_pair, out, *RAGGED))
    assert cfg.rollout.stream
    pipeline, rows, data = _run(cfg, kills={"rollout": 0, "teacher": 1})

    for n, ((batch, scores, old), got) in data.items():
        for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "prompt_index"):
            assert torch.equal(getattr(got.batch, name), getattr(batch, name)), (n, name)
        assert got.batch.finish_reason == batch.finish_reason
        close = {"atol": 1e-5, "rtol": 1e-5}
        torch.testing.assert_close(got.batch.sampler_logprobs, batch.sampler_logprobs, **close)
        for name in ("token_logprobs", "entropy", "topk_logprobs"):
            torch.testing.assert_close(getattr(got.scores, name), getattr(scores, name), **close)
        assert torch.equal(got.scores.topk_ids, scores.topk_ids)
        torch.testing.assert_close(got.old, old, **close)
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
    timeline = Timeline.from_json((out / "timeline.json").read_text())
    assert timeline.step == 1 and timeline.mode == "streamed"
    stages = {(w.split("-")[0], stage) for w, stage, *_ in timeline.intervals}
    assert {("rollout", "generate"), ("teacher", "score"), ("learner", "pi_old")} <= stages
    assert {("learner", "train"), ("rollout", "sync")} <= stages
    _check_run_outputs(pipeline, cfg, out, rows)


def _check_run_outputs(pipeline: Pipeline, cfg, out, history) -> None:
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and len(history) == 2
    for row in rows:
        missing = METHOD_METRICS - set(row)
        assert not missing, missing
        assert row["rollout/version_lag"] == 0
    assert [r["rollout/weight_version"] for r in rows] == [0, 1]
    assert pipeline.version == 2
    # The run directory holds the resolved config, with the run's id, and it reloads equal.
    assert pipeline.cfg.run.id and load_config(out / "config.yaml") == pipeline.cfg
    assert dataclasses.replace(pipeline.cfg, run=cfg.run) == cfg
    # pi_old recomputed by the learner agrees with vLLM's sampler (same weights, fp32, the same
    # tempered distribution) at every step, i.e. after every weight sync.
    assert all(r["opd/sampler_gap"] < 1e-3 for r in rows), [r["opd/sampler_gap"] for r in rows]
    # TensorBoard events sit next to metrics.jsonl.
    assert list(out.glob("events.out.tfevents.*"))
    # Every series the shipped Grafana dashboard plots is a metric the run exports.
    exported = {metric_name(k) for k in rows[0] if k != "step"} | {"eopd_step"}
    exported |= {
        metric_name(f"{s}/tokens_per_s", "eopd_worker") for s in ("rollout", "teacher", "train")
    }
    dashboard = (REPO / "docs" / "grafana" / "eopd-training.json").read_text()
    plotted = set(re.findall(r"ray_(eopd_[a-z0-9_]+)", dashboard))
    assert plotted and plotted <= exported, plotted - exported


def _greedy(pipeline: Pipeline, prompts: list[list[int]]) -> list[list[list[int]]]:
    """Greedy responses from every rollout worker."""
    sampling = Sampling(temperature=0.0, max_new_tokens=12)
    indices = list(range(len(prompts)))
    refs = pipeline.rollout.call_async("generate", prompts, indices, indices, sampling)
    batches = pipeline.rollout.get(refs, 120, "greedy")
    return [
        [r[m].tolist() for r, m in zip(b.response_ids, b.response_mask, strict=True)]
        for b in batches
    ]


def test_weight_sync_is_real_and_bounded(local_ray, tiny_pair, tmp_path):
    """After a step the rollout engines decode exactly like HF with the learner's new weights,
    and unlike the previous version; one sync costs a fixed number of Ray calls. The step makes
    one update (mini-batch = its 8 sequences): the streamed groups go to no learner for pi_old,
    which comes from the update's own forward (the streamed test covers pi_old per group)."""
    cfg = load_config(
        TINY,
        tiny_overrides(
            tiny_pair, tmp_path / "run", "run.steps=1", "learner.lr=1e-2",
            "learner.mini_batch_size=8",
        ),
    )  # fmt: skip
    pipeline = Pipeline(cfg)
    try:
        pipeline.start()
        prompts = pipeline.prompts[:3]
        before = _greedy(pipeline, prompts)
        calls_before = pipeline.learner.num_calls + pipeline.rollout.num_calls
        metrics = pipeline.step(0)
        # One step = 2 rollout streams + 2 train + 2 "who are you" (a rollout worker restarted
        # while idle is in no sync group) + (2 broadcast + 2 receive) sync calls + (1 sent
        # checksum + 2 confirm) + (2 + 2) probe calls checking the sync: fixed, whatever the
        # number of parameter tensors or streamed groups.
        calls = pipeline.learner.num_calls + pipeline.rollout.num_calls - calls_before
        assert metrics["stream/groups"] >= 2
        assert calls == 2 + 2 + 2 + (2 + 2) + (1 + 2) + (2 + 2)
        assert pipeline.groups.student_dropout is False  # what the learners' set-up found
        assert metrics["learner/old_logprobs_from_update"] == 1.0
        assert metrics["learner/old_logprobs_overlapped"] == 0.0
        assert metrics["opd/sampler_gap"] < 1e-3  # checked on the update's own forward
        _check_sync_parts(metrics)
        after = _greedy(pipeline, prompts)
        buckets = pipeline.learner.get(pipeline.learner.call_async("weight_buckets"), 120, "w")[0]
    finally:
        pipeline.shutdown()
    assert sum(len(b) for b in buckets) > 4 * len(buckets)  # many tensors per bucket

    model = AutoModelForCausalLM.from_pretrained(cfg.model.student_path).eval()
    model.load_state_dict({n: t for b in buckets for n, t in b}, strict=True)
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(ids[len(prompt) :])
    assert after[0] == after[1] == expected  # both rollout workers hold version 1
    assert before[0] != after[0]


def _check_sync_parts(metrics: dict[str, float]) -> None:
    """`time/sync_s` is split into parts that add up (docs/monitoring.md); the slowest engine's
    load into its receive, reload and cache reset; nothing is negative."""
    parts = {k.removeprefix("sync/").removesuffix("_s"): v for k, v in metrics.items()
             if k.startswith("sync/")}  # fmt: skip
    top = ("who", "transfer", "confirm", "probe")
    inside = ("engine_load", "engine_checksum", "learner_checksum", "learner_send")
    engine = ("engine_receive", "engine_reload", "engine_cache_reset")
    assert set(parts) == {*top, *inside, *engine}, sorted(parts)
    assert all(v >= 0 for v in parts.values()), parts
    # The parts are laps of one clock inside the timed sync: they add up to all of it but a few
    # calls (bounded loosely: a loaded 2-core machine may pause the driver between any two).
    laps = sum(parts[p] for p in top)
    assert 0 < laps <= metrics["time/sync_s"] < laps + 1.0, (laps, metrics["time/sync_s"])
    assert all(parts[p] <= parts["transfer"] for p in inside)
    assert sum(parts[p] for p in engine) == pytest.approx(parts["engine_load"], abs=1e-9)
    assert parts["engine_receive"] > 0 and parts["engine_reload"] > 0  # collective: both real


def test_learning_reduces_reverse_kl(local_ray, tiny_pair, tmp_path):
    """Against a fixed, sharper teacher the sampled-token reverse KL falls clearly."""
    student = sharpened_copy(tiny_pair[0], tmp_path / "student", 10.0)
    teacher = sharpened_copy(tiny_pair[0], tmp_path / "teacher", 30.0)
    cfg = load_config(
        TINY,
        tiny_overrides(
            (student, teacher),
            tmp_path / "run",
            "run.steps=30",
            "learner.lr=1e-3",
            "learner.grad_clip=0",
        ),
    )
    _, history = run(cfg)
    rkl = [h["kl/reverse_sampled"] for h in history]
    first, last = sum(rkl[:5]) / 5, sum(rkl[-5:]) / 5
    assert last < 0.7 * first, rkl


def test_placement_failure_names_what_was_asked_and_what_the_cluster_has(
    local_ray, tiny_pair, tmp_path
):
    from eopd_ray.driver.actors import WorkerError

    cfg = load_config(
        TINY,
        tiny_overrides(
            tiny_pair, tmp_path / "run", "learner.gpus_per_worker=1", "run.step_timeout_s=3"
        ),
    )
    pipeline = Pipeline(cfg)
    with pytest.raises(WorkerError) as exc:
        pipeline.start()
    pipeline.shutdown()
    message = str(exc.value)
    assert "'GPU': 2.0" in message and "cluster has" in message and "gpus_per_worker" in message


def test_async_rollout_runs_one_version_behind_and_checkpoints_before_the_prefetch(
    local_ray, tiny_pair, tmp_path
):
    """Plus a rollout worker killed while step 4's rollout is prefetched (during step 3): the
    prefetch is dropped, not redone under the old version's label, and step 4 samples on the
    synced weights (version 4, lag 0)."""
    import os
    import signal

    from eopd_ray.storage import checkpoint

    out = tmp_path / "run"
    cfg = load_config(
        TINY,
        tiny_overrides(
            tiny_pair,
            out,
            "run.steps=5",
            "run.checkpoint_every=2",
            "run.keep_checkpoints=3",
            "rollout.async_lag=1",
            "learner.old_logprobs=sampler",
        ),
    )
    pipeline = Pipeline(cfg)

    def launch_then_kill(step: int, timeline) -> None:
        launch(step, timeline)
        if step == 3:  # the generate call for step 4 is in flight: its worker dies
            os.kill(pipeline.rollout.identities[0].pid, signal.SIGKILL)

    try:
        pipeline.start()
        launch = pipeline.rollouts.prefetch_next
        pipeline.rollouts.prefetch_next = launch_then_kill
        rows = pipeline.run(progress="lines")
    finally:
        pipeline.shutdown()
    # Step 0 is generated synchronously; later batches were sampled while the previous step
    # trained, with the weights from before that step's update; step 4's prefetch was lost.
    assert [r["rollout/weight_version"] for r in rows] == [0, 0, 1, 2, 4]
    assert [r["rollout/version_lag"] for r in rows] == [0, 1, 1, 1, 0]
    assert pipeline.version == 5 and pipeline.num_recoveries == 1
    assert all("time/rollout_wait_s" in r for r in rows)
    # The checkpoint after step 1 was taken with step 2's rollout in flight: its data position
    # is that of 2 steps, so a resumed run takes step 2's prompts again. After step 3 the
    # dropped prefetch had given its prompts back.
    per_step = cfg.rollout.prompts_per_step
    positions = {c.step: c.stream for c in checkpoint.complete_checkpoints(pipeline.store)}
    assert positions[1] == {"epoch": 0, "offset": 2 * per_step}
    assert positions[3] == {"epoch": 0, "offset": 4 * per_step}
    assert positions[4] == {"epoch": 0, "offset": 5 * per_step}
