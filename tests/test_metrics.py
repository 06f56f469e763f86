"""Reducing the learners' micro-batch metrics to one row per step, the JSONL sink and the
TensorBoard sink."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eopd_ray.storage.run_storage import RunStorage
from eopd_ray.telemetry.step_metrics import (
    JsonlSink,
    TensorBoardSink,
    read_jsonl,
    reduce_learner_metrics,
)


def test_loss_sums_over_shards_and_means_over_updates_others_weight_by_tokens():
    rank0 = [
        {
            "loss/opd": 0.25,
            "gate/frac": 0.5,
            "fkl/on_gated": 2.0,
            "tokens/num_valid": 10,
            "update": 0,
            "opd/sampler_gap_sum": 1.0,
        },
        {
            "loss/opd": 0.5,
            "gate/frac": 1.0,
            "fkl/on_gated": 4.0,
            "tokens/num_valid": 30,
            "update": 1,
            "learner/lr": 1.0,
        },
    ]
    rank1 = [
        {
            "loss/opd": 0.75,
            "gate/frac": 0.0,
            "fkl/on_gated": 0.0,
            "tokens/num_valid": 20,
            "update": 0,
            "learner/lr": 3.0,
        }
    ]
    out = reduce_learner_metrics([rank0, rank1], num_updates=2)
    assert out["loss/opd"] == pytest.approx((0.25 + 0.5 + 0.75) / 2)
    assert out["gate/frac"] == pytest.approx((0.5 * 10 + 1.0 * 30 + 0) / 60)
    # fkl/on_gated weighs by gated tokens: 5 and 30 gated tokens
    assert out["fkl/on_gated"] == pytest.approx((2.0 * 5 + 4.0 * 30) / 35)
    assert out["learner/lr"] == pytest.approx(2.0)
    assert out["opd/sampler_gap"] == pytest.approx(1.0 / 60)
    assert out["tokens/trained"] == 60


def test_a_placeholder_ending_an_update_reduces_without_tokens():
    """equalize_counts pads a rank's update with zero-weight placeholders at its end, so the
    boundary micro-batch may be a placeholder: it reports the update's learner/* metrics and no
    tokens (what LearnerWorker.train_step returned for it before, and what it returns now)."""
    rank0 = [
        {"loss/opd": 0.5, "gate/frac": 0.5, "tokens/num_valid": 10, "update": 0},
        {"loss/opd": 0.25, "gate/frac": 1.0, "tokens/num_valid": 6, "update": 0},
        {"learner/grad_norm": 2.0, "learner/lr": 1.0},  # rank 0 ends on a placeholder
    ]
    rank1 = [
        {"loss/opd": 0.25, "gate/frac": 0.0, "tokens/num_valid": 4, "update": 0},
        {"tokens/num_valid": 0.0, "learner/grad_norm": 2.0, "learner/lr": 1.0},
    ]
    out = reduce_learner_metrics([rank0, rank1], num_updates=1)
    assert out["tokens/trained"] == 20
    assert out["loss/opd"] == pytest.approx(1.0)
    assert out["gate/frac"] == pytest.approx((0.5 * 10 + 6) / 20)
    assert out["learner/grad_norm"] == pytest.approx(2.0)


def test_sink_appends_rows_and_keeps_an_earlier_file(tmp_path):
    store = RunStorage(str(tmp_path))
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(store)
    sink.write(0, {"a": 1.0})
    sink.write(1, {"a": 2.0})
    sink.close()
    assert read_jsonl(path) == [{"step": 0, "a": 1.0}, {"step": 1, "a": 2.0}]
    JsonlSink(store).close()
    kept = [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]
    assert len(kept) == 1 and len(read_jsonl(kept[0])) == 2


@pytest.mark.parametrize("kind", ["local", "object store"])
def test_sink_resumes_without_gaps_or_repeats(tmp_path, kind):
    """A resumed run keeps the steps before the checkpoint's next step and appends; on an
    object store (here pyarrow's in-memory filesystem) the whole file is uploaded every step."""
    import pyarrow.fs as pafs

    store = (
        RunStorage(str(tmp_path))
        if kind == "local"
        else RunStorage("bucket/run", filesystem=pafs._MockFileSystem())
    )
    sink = JsonlSink(store)
    for step in range(4):
        sink.write(step, {"a": float(step)})
    sink.close()
    sink = JsonlSink(store, resume_from_step=2)  # the checkpoint was after step 1
    assert [json.loads(r)["step"] for r in store.read_text("metrics.jsonl").splitlines()] == [0, 1]
    sink.write(2, {"a": 20.0})
    sink.close()
    rows = [json.loads(r) for r in store.read_text("metrics.jsonl").splitlines()]
    assert [(r["step"], r["a"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 20.0)]


def _scalars(store: RunStorage, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` in the run directory's TensorBoard event files, as read back from
    the store (downloaded first from an object store)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    names = [n for n in store.listdir("") if n.startswith("events.out.tfevents.")]
    assert names, f"no event file in {store.show()}: {store.listdir('')}"
    local = store.fetch("")
    out = []
    for name in names:
        events = EventAccumulator(str(Path(local) / name))
        events.Reload()
        out += [(e.step, e.value) for e in events.Scalars(tag)]
    return sorted(out)


def test_tensorboard_events_are_in_the_store_after_every_step(store):
    """Readable from the run directory after each write, before the sink closes; closing adds
    no second copy."""
    sink = TensorBoardSink(store)
    for step in range(3):
        sink.write(step, {"loss/opd": float(step) / 4})
        assert _scalars(store, "loss/opd") == [(s, s / 4) for s in range(step + 1)]
    sink.close()
    assert _scalars(store, "loss/opd") == [(0, 0.0), (1, 0.25), (2, 0.5)]


def test_tensorboard_events_survive_a_hard_exit_on_s3(s3, tmp_path):
    """SIGTERM's abandon path ends the driver with os._exit(143) (driver/stopping.py): the sink
    is never closed, yet every step it wrote is on the object store (issue 31, finding 9)."""
    uri = s3.uri(f"runs/{tmp_path.name}")
    child = textwrap.dedent(
        f"""
        import os
        from eopd_ray.storage.run_storage import RunStorage
        from eopd_ray.telemetry.step_metrics import TensorBoardSink

        sink = TensorBoardSink(RunStorage({uri!r}))
        for step in range(3):
            sink.write(step, {{"loss/opd": float(step)}})
        os._exit(143)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 143, done.stderr
    assert _scalars(RunStorage(uri), "loss/opd") == [(0, 0.0), (1, 1.0), (2, 2.0)]
