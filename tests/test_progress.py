"""StepProgress: lines (when, and what they say) under a fake clock; the bar only on a TTY."""

from __future__ import annotations

import io
import logging
import re

import pytest

from eopd_ray.driver.progress import StepProgress, format_duration

# 2468.8 student tokens in a 2 s step: 1234 tok/s (not the learner's own rate, 9999).
METRICS = {
    "loss/total": 0.123456,
    "kl/reverse_sampled": 0.4567,
    "tokens/trained": 2468.8,
    "time/step_s": 2.0,
    "train/tokens_per_s": 9999.0,
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "eopd_ray.driver.progress"]


def run_steps(progress: StepProgress, clock: FakeClock, steps: range, step_s: float) -> None:
    for step in steps:
        clock.now += step_s  # the step runs, then reports
        progress.update(step, METRICS)


def test_lines_first_last_and_at_most_one_per_interval(caplog):
    caplog.set_level(logging.INFO, logger="eopd_ray.driver.progress")
    clock = FakeClock()
    progress = StepProgress(0, 100, mode="lines", every_s=30.0, stream=io.StringIO(), clock=clock)
    run_steps(progress, clock, range(100), step_s=1.0)
    progress.close()

    lines = progress_lines(caplog)
    # Step 0 ends at t=1 and is logged; then t=31, 61, 91 (30 s later each), and the last step.
    # "step N" names the step (0-based, as metrics.jsonl and the checkpoints); the count is done.
    assert [line.split(" |")[0] for line in lines] == [
        "step 0 done (1/100, 1%)",
        "step 30 done (31/100, 31%)",
        "step 60 done (61/100, 61%)",
        "step 90 done (91/100, 91%)",
        "step 99 done (100/100, 100%)",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_line_content(caplog):
    caplog.set_level(logging.INFO, logger="eopd_ray.driver.progress")
    clock = FakeClock()
    progress = StepProgress(0, 300, mode="lines", stream=io.StringIO(), clock=clock)
    run_steps(progress, clock, range(12), step_s=1.2)  # the first step is logged at once

    first = progress_lines(caplog)[0]
    # 299 steps left at 1.2 s each = 358.8 s -> 5m59s.
    assert first == (
        "step 0 done (1/300, 0%) | loss 0.1235 | reverse KL 0.457 | 1234 tok/s | 1.2 s/step | "
        "ETA 5m59s"
    )
    progress.close()  # logs step 12, not yet logged: every_s has not passed
    last = progress_lines(caplog)[-1]
    assert last.startswith("step 11 done (12/300, 4%) | ")
    assert last.endswith("| 1.2 s/step | ETA 5m46s")  # 288 x 1.2 s = 345.6 s


def test_eta_uses_only_steps_run_by_this_process(caplog):
    caplog.set_level(logging.INFO, logger="eopd_ray.driver.progress")
    clock = FakeClock()
    clock.now = 5000.0  # a resumed run: steps 0..199 took place in an earlier process
    progress = StepProgress(200, 300, mode="lines", stream=io.StringIO(), clock=clock)
    run_steps(progress, clock, range(200, 201), step_s=90.0)
    # 99 steps left x 90 s = 8910 s = 2h28m30s, shown to the minute.
    assert progress_lines(caplog) == [
        "step 200 done (201/300, 67%) | loss 0.1235 | reverse KL 0.457 | 1234 tok/s | "
        "90.0 s/step | ETA 2h28m"
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (45, "45s"), (59.6, "1m00s"), (340, "5m40s"), (7380, "2h03m"), (3600, "1h00m")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_missing_metrics_print_a_dash(caplog):
    caplog.set_level(logging.INFO, logger="eopd_ray.driver.progress")
    clock = FakeClock()
    progress = StepProgress(0, 10, mode="lines", stream=io.StringIO(), clock=clock)
    clock.now = 2.0
    progress.update(0, {"loss/total": 0.5})
    (line,) = progress_lines(caplog)
    assert line == (
        "step 0 done (1/10, 10%) | loss 0.5000 | reverse KL - | - tok/s | 2.0 s/step | ETA 18s"
    )

    bar_stream = TtyStream()
    bar = StepProgress(0, 10, mode="bar", stream=bar_stream)
    bar.update(0, {})
    bar.close()
    assert "loss=-, rkl=-, tok_s=-" in bar_stream.getvalue()


def test_auto_draws_lines_off_a_tty_and_a_bar_on_one(caplog):
    caplog.set_level(logging.INFO, logger="eopd_ray.driver.progress")
    log_stream = io.StringIO()
    lines = StepProgress(0, 3, stream=log_stream)
    assert lines.mode == "lines"
    for step in range(3):
        lines.update(step, METRICS)
    lines.close()
    assert log_stream.getvalue() == ""  # nothing drawn on the stream: it goes to the logger
    assert len(progress_lines(caplog)) == 2  # first and last: 3 steps take far less than every_s

    caplog.clear()
    tty = TtyStream()
    bar = StepProgress(0, 3, stream=tty)
    assert bar.mode == "bar"
    for step in range(3):
        bar.update(step, METRICS)
    bar.close()
    drawn = tty.getvalue()
    assert re.search(r"eopd steps done: 100%.*\b3/3\b", drawn), drawn
    assert "loss=0.1235, rkl=0.457, tok_s=1234" in drawn
    assert progress_lines(caplog) == []


def test_bar_starts_at_the_resumed_step():
    tty = TtyStream()
    bar = StepProgress(5, 10, mode="bar", stream=tty)
    bar.update(5, METRICS)
    bar.close()
    assert "6/10" in tty.getvalue()


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'tty'"):
        StepProgress(0, 10, mode="tty")
