"""When the run checkpoints (eopd_ray/driver/run_checkpoints.py `checkpoint_due`): every
`run.checkpoint_every` steps and after the first step that ends `run.checkpoint_every_s` after
the previous checkpoint, either triggering. Pure: no Ray."""

from __future__ import annotations

import pytest

from eopd_ray.driver.run_checkpoints import checkpoint_due


def _cadence(step_s: list[float], every: int, every_s: float) -> list[int]:
    """The steps `Pipeline.run` checkpoints after (periodically) for steps lasting `step_s`: the
    clock starts at the loop's start and restarts at each checkpoint."""
    now = since = 0.0
    saved = []
    for step, took in enumerate(step_s):
        now += took
        if checkpoint_due(step, now - since, every, every_s):
            saved.append(step)
            since = now
    return saved


def test_both_off_never_checkpoints_periodically():
    assert _cadence([1e6] * 10, every=0, every_s=0.0) == []


def test_steps_alone_every_n_steps():
    assert _cadence([1.0] * 10, every=3, every_s=0.0) == [2, 5, 8]


@pytest.mark.parametrize(
    "step_s, every_s, saved",
    [
        ([40.0] * 10, 100.0, [2, 5, 8]),  # 120 s since the last: the first step past 100 s
        ([50.0] * 6, 100.0, [1, 3, 5]),  # exactly the interval counts
        ([30.0, 30.0, 200.0, 10.0, 10.0], 100.0, [2]),  # a long step: at once after it
        ([1000.0] * 3, 600.0, [0, 1, 2]),  # steps longer than the interval: after every one
    ],
)
def test_time_alone_after_the_first_step_past_the_interval(step_s, every_s, saved):
    assert _cadence(step_s, every=0, every_s=every_s) == saved


def test_either_triggers_and_each_checkpoint_restarts_the_clock():
    # Steps of 40 s, every 4 steps or 100 s: 100 s pass after step 2 (120 s); from there,
    # step 3 is the 4th step (step-based, only 40 s later) and restarts the clock; then the
    # time trigger again after step 6 (120 s after step 3), and step 7 is the 8th step.
    assert _cadence([40.0] * 10, every=4, every_s=100.0) == [2, 3, 6, 7]


def test_the_lost_time_is_bounded_by_the_interval_plus_a_step():
    """What a stop that cannot checkpoint loses: the time since the last checkpoint, which
    never exceeds run.checkpoint_every_s plus the longest step."""
    step_s = [37.0, 95.0, 61.0, 30.0, 88.0, 45.0, 100.0, 52.0, 73.0, 40.0] * 5
    every_s = 600.0
    saved, now, since, worst = set(_cadence(step_s, 0, every_s)), 0.0, 0.0, 0.0
    for step, took in enumerate(step_s):
        now += took
        worst = max(worst, now - since)
        if step in saved:
            since = now
    assert 0 < len(saved) <= sum(step_s) // every_s  # one per interval, not one per step
    assert worst < every_s + max(step_s)


def test_the_pipeline_decides_with_the_same_function():
    import eopd_ray.driver.pipeline as pipeline_module

    assert pipeline_module.checkpoint_due is checkpoint_due


class _RunWithoutWorkers:
    """What `Pipeline.run` calls on its pipeline, without Ray or workers: each step takes
    `step_s` seconds of a fake clock, and the checkpoints are only recorded."""

    def __init__(self, cfg, store, clock: list[float], step_s: float) -> None:
        self.cfg, self.store, self.clock, self.step_s = cfg, store, clock, step_s
        self.start_step, self.config_changes, self.stopped_early = 0, [], False
        self.saved: list[int] = []
        self.claim = type("Claim", (), {"check": lambda self, what: None})()
        self.evaluation = type("Evaluation", (), {"due": lambda self, step: False})()
        self.checkpoints = self  # save() and commit_uploaded() below

    def step(self, step: int) -> dict[str, float]:
        self.clock[0] += self.step_s
        return {"loss/opd": 1.0}

    def commit_uploaded(self, wait: bool) -> None:
        return None

    def save(self, step: int, wait: bool = True) -> None:
        self.clock[0] += 5.0  # the checkpoint's own time does not delay the next one
        self.saved.append(step)

    def _abandoned_message(self) -> str:
        return "abandoned"


def test_pipeline_run_checkpoints_on_the_wall_clock(tmp_path, monkeypatch):
    """`Pipeline.run` itself (a fake clock, no workers): steps of 40 s with
    run.checkpoint_every_s = 100 checkpoint after steps 2 and 5 (120 s after the start, then
    after the previous checkpoint's step ended) and after the last step."""
    import eopd_ray.driver.pipeline as pipeline_module
    from eopd_ray.config import config_from_dict
    from eopd_ray.storage.run_storage import RunStorage

    clock = [0.0]
    monkeypatch.setattr(pipeline_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(pipeline_module, "RayMetricsSink", lambda *a: _NoSink())
    cfg = config_from_dict(
        {"model": {"student_path": "s", "teacher_path": "t"}, "data": {"toy_prompts": 16}},
        ["run.steps=8", "run.checkpoint_every_s=100", "run.export_hf=false"],
    )
    run = _RunWithoutWorkers(cfg, RunStorage(str(tmp_path)), clock, step_s=40.0)
    rows = pipeline_module.Pipeline.run(run, progress="lines")
    assert len(rows) == 8
    assert run.saved == [2, 5, 7]


class _NoSink:
    def write(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
