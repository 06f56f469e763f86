"""Where one step's time goes, per worker: the intervals each worker spent on each stage.

The driver records `(worker, stage, start, end)` wall-clock intervals as calls come back (the
workers time themselves: `_Identified.timed`, and the streamed rollout's groups carry their
times). From them:

    role_metrics(timeline, step_s)  roles/<role>_busy_s   mean over the role's workers of the
                                                          time spent on any stage
                                    roles/<role>_wait_s   step_s minus that
                                    roles/slowest_s       the busiest role's busy seconds
                                    roles/step_over_slowest   step_s / slowest_s: 1.0 when the
                                                          step is as short as its busiest role

`Timeline.to_json()` is what `<run dir>/timeline.json` holds (the latest step) and what
`eopd_ray.evaluation.plots.plot_timeline` draws: one bar per worker, coloured by stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

ROLES = ("rollout", "teacher", "learner")


@dataclass
class Timeline:
    """One step's intervals. Workers are named `<role>-<rank>`; times are time.time()."""

    step: int
    mode: str  # "sync" | "streamed" (+ "+async" when rollout.async_lag is 1)
    started: float = field(default_factory=time.time)
    intervals: list[tuple[str, str, float, float]] = field(default_factory=list)

    def add(self, worker: str, stage: str, start: float, end: float) -> None:
        self.intervals.append((worker, stage, start, max(start, end)))

    def add_role(self, role: str, count: int, stage: str, start: float, end: float) -> None:
        """The same interval for every worker of a role (a collective call: training, sync)."""
        for rank in range(count):
            self.add(f"{role}-{rank}", stage, start, end)

    def busy_s(self, worker: str) -> float:
        """Seconds `worker` spent on any stage (overlapping intervals counted once)."""
        spans = sorted((s, e) for w, _, s, e in self.intervals if w == worker)
        total, end = 0.0, float("-inf")
        for s, e in spans:
            if e > end:
                total += e - max(s, end)
                end = e
        return total

    def workers(self, role: str) -> list[str]:
        return sorted({w for w, *_ in self.intervals if w.rsplit("-", 1)[0] == role})

    def to_json(self) -> str:
        return json.dumps(
            {
                "step": self.step,
                "mode": self.mode,
                "started": self.started,
                "intervals": [list(i) for i in self.intervals],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Timeline:
        data = json.loads(text)
        return cls(
            data["step"], data["mode"], data["started"], [tuple(i) for i in data["intervals"]]
        )


def role_metrics(timeline: Timeline, step_s: float) -> dict[str, float]:
    """Busy and waiting seconds per role, and how close the step is to its busiest role."""
    out: dict[str, float] = {}
    for role in ROLES:
        workers = timeline.workers(role)
        if not workers:
            continue
        busy = sum(timeline.busy_s(w) for w in workers) / len(workers)
        out[f"roles/{role}_busy_s"] = busy
        out[f"roles/{role}_wait_s"] = max(0.0, step_s - busy)
    slowest = max((v for k, v in out.items() if k.endswith("_busy_s")), default=0.0)
    if slowest > 0:
        out["roles/slowest_s"] = slowest
        out["roles/step_over_slowest"] = step_s / slowest
    return out
