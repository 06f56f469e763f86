"""Per-step metrics: reducing the learners' micro-batch metrics, and the JSONL sink.

Names follow `area/name` (method.md's list plus `time/*`, `rollout/*`, `learner/*`). Imports
neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.storage.run_storage import RunStorage


def reduce_learner_metrics(
    per_rank: Sequence[Sequence[dict[str, float]]], num_updates: int
) -> dict[str, float]:
    """One dict for the step from every rank's per-micro-batch dicts.

    - `loss/*` are already divided by the global token count of their mini-batch: summing over
      micro-batches and ranks gives each mini-batch's loss; the step reports their mean.
    - `fkl/on_gated` is weighted by the gated tokens of each micro-batch; other means by its
      valid tokens. `learner/*` come from the updates' boundaries (mean).
    - A zero-weight placeholder micro-batch (core.micro_batches) that ends an update on a rank
      reports only `learner/*`: it counts no tokens and weighs in no mean.
    """
    rows = [m for rank in per_rank for m in rank]
    tokens = sum(m.get("tokens/num_valid", 0.0) for m in rows)
    out: dict[str, float] = {}
    keys = {k for m in rows for k in m} - {"update", "tokens/num_valid", "opd/sampler_gap_sum"}
    for key in sorted(keys):
        present = [m for m in rows if key in m]
        if key.startswith("loss/"):
            out[key] = sum(m[key] for m in present) / max(1, num_updates)
        elif key.startswith("learner/"):
            out[key] = sum(m[key] for m in present) / len(present)
        else:
            weight = (
                (lambda m: m["gate/frac"] * m.get("tokens/num_valid", 0.0))
                if key == "fkl/on_gated"
                else (lambda m: m.get("tokens/num_valid", 0.0))
            )
            total = sum(weight(m) for m in present)
            out[key] = sum(m[key] * weight(m) for m in present) / total if total else 0.0
    out["opd/sampler_gap"] = sum(m.get("opd/sampler_gap_sum", 0.0) for m in rows) / max(1, tokens)
    out["tokens/trained"] = tokens
    return out


def data_metrics(
    batch: RolloutBatch, scores: TeacherScores, timed: dict[str, float], lag: int, async_step: bool
) -> dict[str, float]:
    """What a step's batch and scores say, and each role's throughput over its busy time
    (`timed`: the step's time/* and roles/* metrics so far). `lag`: weight versions between the
    sampler and the update; `async_step`: the rollout overlapped training, its time unobserved."""
    tokens = batch.num_response_tokens
    teacher_busy = timed.get("roles/teacher_busy_s") or timed["time/teacher_s"]
    out = {
        "rollout/response_len_mean": float(batch.response_mask.sum(1).float().mean()),
        "rollout/prompt_tokens": float(batch.prompt_mask.sum()),
        "rollout/finish_length_frac": batch.finish_reason.count("length") / batch.num_sequences,
        # Per teacher worker busy second, times the workers: the role's throughput.
        "teacher/tokens_per_s": tokens / max(1e-9, teacher_busy),
        "teacher/entropy_exact": float(scores.entropy_is_exact),
        "train/tokens_per_s": tokens / timed["time/train_s"],
        "rollout/weight_version": float(batch.weight_version),
        "rollout/version_lag": float(lag),
    }
    if not async_step:
        rollout_busy = timed.get("roles/rollout_busy_s") or timed["time/rollout_s"]
        out["rollout/tokens_per_s"] = tokens / max(1e-9, rollout_busy)
    return out


class JsonlSink:
    """Appends one JSON object per step to `<run.output_dir>/metrics.jsonl`, flushed and synced
    so a crash loses at most the step being written. On an object store (no appends) the file
    is kept in node-local scratch space and uploaded whole after every step."""

    NAME = "metrics.jsonl"

    def __init__(self, store: RunStorage, resume_from_step: int | None = None) -> None:
        """A resumed run keeps the rows of the steps before `resume_from_step` and appends, so no
        step is missing or repeated; a new run starts an empty file (storage.run_dir has moved
        an earlier run's file to previous/)."""
        self.store = store
        self.path = (
            store.local_path(self.NAME) if store.is_local else store.staging("metrics") / self.NAME
        )
        kept: list[dict] = []
        if resume_from_step is not None and store.exists(self.NAME):
            rows = [json.loads(line) for line in store.read_text(self.NAME).splitlines() if line]
            kept = [r for r in rows if r["step"] < resume_from_step]
        elif store.exists(self.NAME) and store.is_local:  # not moved aside: never overwrite
            self.path.rename(self.path.with_suffix(f".{int(time.time())}.jsonl"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._fh = self.path.open("a", encoding="utf-8")
        self._publish()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._publish()

    def rewind(self, step: int) -> None:
        """Drop the rows of `step` and later: the run went back to the checkpoint before it
        (a learner group restarted), and those steps are trained again."""
        self._fh.close()
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows if r["step"] < step)
        )
        os.replace(tmp, self.path)
        self._fh = self.path.open("a", encoding="utf-8")
        self._publish()

    def _publish(self) -> None:
        if not self.store.is_local:
            self.store.upload_file(self.path, self.NAME)

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink:
    """TensorBoard event files in the run directory, next to metrics.jsonl
    (`tensorboard --logdir <run.output_dir>`). On an object store they are written in node-local
    scratch space and uploaded whole after every step, as metrics.jsonl is: a driver that exits
    without closing the sink (SIGTERM's abandon path ends in `os._exit`) loses no step it wrote.
    The event file grows by a few KB per step, so each upload stays small."""

    def __init__(self, store: RunStorage) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.store = store
        self.dir = store.local_path() if store.is_local else store.staging("tensorboard")
        self._writer = SummaryWriter(log_dir=str(self.dir))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()  # written to the event file, not just queued
        self._publish()

    def _publish(self) -> None:
        """Each event file, whole, to the run directory (one PUT each: complete or absent)."""
        if self.store.is_local:
            return
        for path in sorted(self.dir.rglob("events.out.tfevents.*")):
            self.store.upload_file(path, path.relative_to(self.dir).as_posix())

    def close(self) -> None:
        self._writer.close()
        if not self.store.is_local:
            self.store.publish(self.dir, "")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
