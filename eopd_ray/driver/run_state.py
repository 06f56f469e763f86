"""The run's state on the driver: one definition of what a checkpoint saves and what a resume or
a learner restart restores.

    state = RunState.begin(stream)   # at the start: step 0, weight version 0
    saved = state.to_save(step)      # what the checkpoint after `step` records (driver's part)
    state.restore(ckpt)              # back to a checkpoint (None: to the run's start)

The learners' DeepSpeed state is theirs (each rank writes its own); everything else a run needs
to go on is here. Owned by `Pipeline`, passed to the parts that read or move it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eopd_ray.core.prompts import PromptStream
from eopd_ray.core.wire import RolloutBatch
from eopd_ray.driver.actors import ActorGroup
from eopd_ray.driver.background_stream import StreamInBackground
from eopd_ray.driver.cancelling import cancel_calls
from eopd_ray.driver.streamed import StreamedBatch
from eopd_ray.storage import checkpoint
from eopd_ray.storage.checkpoint import Checkpoint


@dataclass
class PendingRollout:
    """A rollout in flight: its Ray refs, the weight version it must carry, and the prompt-stream
    position before its prompts were taken (to redo it, or to checkpoint as if not started)."""

    step: int
    refs: list[Any]
    expected_version: int
    stream_state: dict[str, int]
    parts: list[RolloutBatch] | None = field(default=None)
    times: list[tuple[float, float]] = field(default_factory=list)  # per worker: start, end
    # rollout.stream: the streamed rollout and scoring running in a driver thread, and then
    # what it returned
    background: StreamInBackground | None = None
    streamed: StreamedBatch | None = None

    def cancel(self, rollout: ActorGroup, timeout_s: float) -> None:
        """Stop its generations and wait for them: left running, what the driver does next on
        the rollout workers (a rejoin, a weight push) would queue behind them and time out."""
        if self.background is not None:
            self.background.cancel(timeout_s)
            return
        workers = rollout.handles[: len(self.refs)]
        cancel_calls(self.refs, workers, timeout_s, f"step {self.step} rollout (prefetched)")


@dataclass(frozen=True)
class SavedState:
    """The driver's part of the checkpoint after `step` (eopd_ray.storage.checkpoint.commit)."""

    step: int  # the last completed step
    weight_version: int
    stream: dict[str, int]  # PromptStream.state_dict(): where the next step takes its prompts
    rng: dict  # checkpoint.rng_state(): the driver's random states


@dataclass
class RunState:
    """Where the run is. A checkpoint saves `to_save()`; a resume or a learner restart goes back
    with `restore()`. The prefetched rollout (rollout.async_lag) is not saved: its prompts are
    taken again by a resumed run."""

    stream: PromptStream  # the prompt stream: its position is the next prompts to take
    initial: SavedState  # the run's start: where a learner restart with no checkpoint goes back
    version: int = 0  # the weight version every rollout engine holds, checksums confirmed
    next_step: int = 0
    last_checkpoint: Checkpoint | None = None  # the newest complete one: the resume point
    prefetched: PendingRollout | None = None  # rollout.async_lag: the next step's rollout

    @classmethod
    def begin(cls, stream: PromptStream) -> RunState:
        return cls(stream, SavedState(-1, 0, stream.state_dict(), checkpoint.rng_state()))

    def to_save(self, step: int) -> SavedState:
        """The state after `step`, as its checkpoint records it."""
        pending = self.prefetched
        position = pending.stream_state if pending else self.stream.state_dict()
        return SavedState(step, self.version, position, checkpoint.rng_state())

    def restore(self, ckpt: Checkpoint | None) -> None:
        """Back to checkpoint `ckpt` (None: the run's start): prompt stream, driver RNG, next
        step, resume point. The weight version follows once every rollout engine holds the
        checkpoint's weights (`WeightVersions.push`)."""
        saved = (
            self.initial
            if ckpt is None
            else SavedState(ckpt.step, ckpt.weight_version, ckpt.stream, ckpt.rng)
        )
        self.stream.load_state_dict(saved.stream)
        checkpoint.set_rng_state(saved.rng)
        self.next_step = saved.step + 1
        self.last_checkpoint = ckpt

    def take_prefetched(self) -> PendingRollout | None:
        pending, self.prefetched = self.prefetched, None
        return pending
