"""Reducing the learners' micro-batch metrics to one row per step, and the JSONL sink."""

from __future__ import annotations

import json

import pytest

from eopd_ray.storage.run_storage import RunStorage
from eopd_ray.telemetry.step_metrics import JsonlSink, read_jsonl, reduce_learner_metrics


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
