"""Wire types: validation at construction, cheap pickling, selection, splitting, joining."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.errors import BatchError


def rollout(b: int = 4, p: int = 3, t: int = 5, version: int = 2) -> RolloutBatch:
    g = torch.Generator().manual_seed(b * 100 + t)
    return RolloutBatch(
        prompt_ids=torch.randint(0, 50, (b, p), generator=g),
        prompt_mask=torch.ones(b, p, dtype=torch.bool),
        response_ids=torch.randint(0, 50, (b, t), generator=g),
        response_mask=torch.arange(t)[None].expand(b, t) < torch.arange(1, b + 1)[:, None],
        sampler_logprobs=-torch.rand(b, t, generator=g),
        prompt_index=torch.arange(b),
        finish_reason=tuple("stop" if i % 2 else "length" for i in range(b)),
        weight_version=version,
    )


def scores(b: int = 4, t: int = 5, k: int = 3) -> TeacherScores:
    return TeacherScores(
        token_logprobs=-torch.rand(b, t),
        entropy=torch.rand(b, t),
        topk_ids=torch.randint(0, 50, (b, t, k), dtype=torch.int32),
        topk_logprobs=-torch.rand(b, t, k),
    )


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("response_ids", torch.zeros(4, 5, dtype=torch.int32), "dtype torch.int64"),
        ("response_mask", torch.ones(4, 6, dtype=torch.bool), "shape (4, 5)"),
        ("sampler_logprobs", torch.zeros(4, 5, dtype=torch.float64), "dtype torch.float32"),
        ("prompt_index", [0, 1, 2, 3], "torch.Tensor"),
        ("finish_reason", ("stop",) * 3, "expected 4 entries"),
        ("finish_reason", ("stop", "stop", "eos", "stop"), "unknown values ['eos']"),
        ("weight_version", -1, "weight_version"),
    ],
)
def test_rollout_batch_rejects_bad_fields(field, value, words):
    fields = {f.name: getattr(rollout(), f.name) for f in dataclasses.fields(RolloutBatch)}
    with pytest.raises(BatchError) as exc:
        RolloutBatch(**{**fields, field: value})
    assert words in str(exc.value)


def test_teacher_scores_reject_bad_fields_and_check_their_batch():
    good = scores()
    with pytest.raises(BatchError, match="int32"):
        TeacherScores(good.token_logprobs, good.entropy, good.topk_ids.long(), good.topk_logprobs)
    with pytest.raises(BatchError, match=r"\(4, 5, 3\)"):
        TeacherScores(good.token_logprobs, good.entropy, good.topk_ids, good.topk_logprobs[..., :2])
    good.check_matches(rollout())
    with pytest.raises(BatchError, match="cover shape"):
        good.check_matches(rollout(t=6))


def test_payload_is_8k_plus_8_bytes_per_token():
    b, t, k = 4, 5, 16
    assert scores(b, t, k).nbytes == b * t * (8 * k + 8)


def test_pickling_is_zero_copy_out_of_band_and_round_trips():
    batch = rollout()
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == len(RolloutBatch._tensor_fields)  # tensors travel out of band
    assert len(payload) < 1000  # the pickle itself is only metadata
    clone = pickle.loads(payload, buffers=buffers)
    for name in RolloutBatch._tensor_fields:
        assert torch.equal(getattr(clone, name), getattr(batch, name)), name
    assert clone.finish_reason == batch.finish_reason
    assert clone.weight_version == batch.weight_version
    sc = scores()
    again = pickle.loads(pickle.dumps(sc))
    assert torch.equal(again.topk_ids, sc.topk_ids) and again.entropy_is_exact


def test_split_select_and_concat_round_trip():
    batch = rollout(b=5)
    shards = batch.split(2)
    assert [s.num_sequences for s in shards] == [2, 3]
    joined = RolloutBatch.concat(shards)
    for name in RolloutBatch._tensor_fields:
        assert torch.equal(getattr(joined, name), getattr(batch, name)), name
    assert joined.finish_reason == batch.finish_reason
    picked = batch.select([4, 0])
    assert picked.prompt_index.tolist() == [4, 0]
    assert picked.finish_reason == (batch.finish_reason[4], batch.finish_reason[0])
    with pytest.raises(BatchError):
        batch.split(6)


def test_concat_pads_ragged_batches_and_refuses_mixed_versions():
    a, b = rollout(b=2, t=3), rollout(b=3, t=6)
    joined = RolloutBatch.concat([a, b])
    assert joined.response_ids.shape == (5, 6)
    assert not joined.response_mask[:2, 3:].any()
    assert torch.equal(joined.response_ids[:2, :3], a.response_ids)
    with pytest.raises(BatchError, match="different weight versions"):
        RolloutBatch.concat([a, rollout(version=3)])
    s = TeacherScores.concat([scores(b=2, t=3), scores(b=3, t=6)])
    assert s.topk_ids.shape == (5, 6, 3)
    with pytest.raises(BatchError, match="top-k"):
        TeacherScores.concat([scores(k=2), scores(k=3)])
