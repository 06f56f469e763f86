"""Step progress for the driver: a tqdm bar on a terminal, timestamped lines in a job log.

Under `ray job logs` stderr is no TTY, and a tqdm bar turns into one wrapped line per refresh
(about 1,200 lines for 600 steps). `StepProgress` draws the bar only on a terminal; elsewhere it
logs one plain line (logger `eopd_ray.driver.progress`) at the first step, then at most one every
`every_s` seconds, and at the last step:

    step 11 done (12/300, 4%) | loss 0.1234 | reverse KL 0.456 | 1234 tok/s | 1.2 s/step | ETA 5m40s

One convention for every step a person reads (docs/running.md): "step N" is the step with
index N, 0 to run.steps - 1, as in metrics.jsonl, the checkpoints' names (step-0000NN) and the
stop and resume messages; a count of steps is written as a count (12/300 done, the bar's 12/300).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import IO

_log = logging.getLogger(__name__)

MODES = ("auto", "bar", "lines")

# (metric key, format) of the values shown, as `Pipeline.step` names them.
_LOSS = ("loss/total", ".4f")
_REVERSE_KL = ("kl/reverse_sampled", ".3f")
_TOKENS_PER_S = ("step/tokens_per_s", ".0f")  # derived here: see _shown


def _shown(metrics: dict[str, float]) -> dict[str, float]:
    """The step's metrics and what progress derives from them: tok/s is student tokens trained
    per second of the whole step (what the benchmarks report), not the learner's own rate
    (`train/tokens_per_s`, per second of training only)."""
    tokens, step_s = metrics.get("tokens/trained"), metrics.get("time/step_s")
    if tokens is None or not step_s:
        return metrics
    return {**metrics, _TOKENS_PER_S[0]: tokens / step_s}


def _metric(metrics: dict[str, float], key_and_format: tuple[str, str]) -> str:
    """The formatted value, or '-' when the step did not report it (e.g. a metric renamed)."""
    key, fmt = key_and_format
    value = metrics.get(key)
    return "-" if value is None else format(value, fmt)


def format_duration(seconds: float) -> str:
    """`45s`, `5m40s`, `2h03m`: short enough for a log line, precise enough for an ETA."""
    if not math.isfinite(seconds):
        return "-"
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def _format_step_time(seconds: float) -> str:
    # One decimal hides sub-second steps (toy runs), so keep two below a second.
    if not math.isfinite(seconds):
        return "-"
    return f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2f}"


class StepProgress:
    """Progress of steps `first_step` .. `total_steps - 1` (0-based, as `Pipeline.run` counts);
    `update` is called once after each step with its metrics."""

    def __init__(
        self,
        first_step: int,
        total_steps: int,
        *,
        mode: str = "auto",
        every_s: float = 30.0,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {MODES}")
        self.first_step, self.total_steps = first_step, total_steps
        self.every_s, self.clock = every_s, clock
        self.stream = sys.stderr if stream is None else stream
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        self.mode = mode
        # The ETA uses only steps run by this process: a resumed run's earlier steps took place
        # elsewhere, and their time is unknown.
        self.start_s = clock()
        self._last_line_s: float | None = None
        self._pending_line: str | None = None  # the latest step's line, if not logged yet
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                desc="eopd steps done",
                unit="step",
                total=total_steps,
                initial=first_step,
                file=self.stream,
            )

    def update(self, step: int, metrics: dict[str, float]) -> None:
        metrics = _shown(metrics)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=_metric(metrics, _LOSS),
                rkl=_metric(metrics, _REVERSE_KL),
                tok_s=_metric(metrics, _TOKENS_PER_S),
                refresh=False,  # the update below redraws once, with the new postfix
            )
            self._bar.update(step + 1 - self._bar.n)
            return

        now = self.clock()
        line = self._line(step, metrics, now)
        first = self._last_line_s is None
        last = step >= self.total_steps - 1
        if first or last or now - self._last_line_s >= self.every_s:
            _log.info("%s", line)
            self._last_line_s, self._pending_line = now, None
        else:
            self._pending_line = line

    def close(self) -> None:
        """Closes the bar; in lines mode logs the latest step if it was not logged yet, so a run
        stopped early (SIGTERM) still ends its log with where it stopped."""
        if self._bar is not None:
            self._bar.close()
        elif self._pending_line is not None:
            _log.info("%s", self._pending_line)
            self._pending_line = None

    def _line(self, step: int, metrics: dict[str, float], now: float) -> str:
        done = step + 1
        run_here = done - self.first_step  # steps timed by this process
        step_s = (now - self.start_s) / run_here if run_here > 0 else math.nan
        eta_s = step_s * max(0, self.total_steps - done)
        percent = 100 * done // self.total_steps if self.total_steps > 0 else 100
        return (
            f"step {step} done ({done}/{self.total_steps}, {percent}%)"
            f" | loss {_metric(metrics, _LOSS)}"
            f" | reverse KL {_metric(metrics, _REVERSE_KL)}"
            f" | {_metric(metrics, _TOKENS_PER_S)} tok/s"
            f" | {_format_step_time(step_s)} s/step"
            f" | ETA {format_duration(eta_s)}"
        )
