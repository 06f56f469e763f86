"""Bucket planning and the standalone gloo broadcast group (two threads, one process)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from eopd_ray.ports import free_port
from eopd_ray.roles.weight_sync import (
    RetiredGroups,
    SyncAborted,
    TensorMeta,
    WeightReceiver,
    WeightSender,
    plan_buckets,
)

# As a worker keeps them: destroying a group joins its thread, stuck in the abandoned op.
RETIRED = RetiredGroups()


def metas(*sizes: int, dtype: str = "float32") -> list[TensorMeta]:
    return [TensorMeta(f"p{i}", (n,), dtype) for i, n in enumerate(sizes)]


def test_buckets_respect_size_order_and_dtype():
    plan = plan_buckets(metas(10, 10, 10, 30, 5), bucket_bytes=80)
    assert [[m.name for m in b] for b in plan] == [["p0", "p1"], ["p2"], ["p3"], ["p4"]]
    mixed = [*metas(4, 4), TensorMeta("h", (4,), "bfloat16")]
    assert [len(b) for b in plan_buckets(mixed, 10**9)] == [2, 1]
    assert len(plan_buckets(metas(*[1] * 1000), 10**9)) == 1  # calls do not grow with tensors


def test_broadcast_delivers_every_bucket_bit_exact():
    tensors = {f"w{i}": torch.randn(3, i + 1) for i in range(6)}
    plan = plan_buckets([TensorMeta(n, tuple(t.shape), "float32") for n, t in tensors.items()], 40)
    port = free_port()
    received: list = []

    def receive():
        rx = WeightReceiver.connect("127.0.0.1", port, 1, 2, plan, 30)
        received.extend(pair for bucket in rx.receive() for pair in bucket)

    thread = threading.Thread(target=receive)
    thread.start()
    tx = WeightSender.connect("127.0.0.1", port, 2, plan, 30)
    for index, bucket in enumerate(plan):
        tx.send(index, [tensors[m.name] for m in bucket])
    thread.join(30)
    assert len(plan) > 1
    assert [n for n, _ in received] == list(tensors)
    for name, tensor in received:
        assert torch.equal(tensor, tensors[name])


def test_a_cancelled_broadcast_ends_in_a_second_not_at_the_group_timeout():
    """A receiver lost between buckets (here: it stops taking them after the first) leaves the
    sender and the other receivers waiting in the broadcast until gloo's own timeout; a sync the
    driver cancelled ends at the next poll, and the group can be retired without blocking."""
    plan = plan_buckets(metas(*[64 * 1024] * 6), 256 * 1024)  # 6 buckets of 256 KiB
    assert len(plan) == 6
    port = free_port()
    stop = threading.Event()
    outcome: dict[str, object] = {}
    lost: list = []  # the "lost" receiver's end stays open: silent, not closed

    def receiver(rank: int, buckets_taken: int | None) -> None:
        rx = WeightReceiver.connect("127.0.0.1", port, rank, 3, plan, 60)
        try:
            for i, _ in enumerate(rx.receive(should_stop=stop.is_set)):
                if buckets_taken is not None and i + 1 == buckets_taken:
                    lost.append(rx)  # "lost": never takes another bucket
                    return
        except SyncAborted as exc:
            outcome[f"rx{rank}"] = exc
        RETIRED.retire(rx)  # must not block on the abandoned op

    threads = [
        threading.Thread(target=receiver, args=(1, None)),
        threading.Thread(target=receiver, args=(2, 1)),
    ]
    for t in threads:
        t.start()
    tx = WeightSender.connect("127.0.0.1", port, 3, plan, 60)
    threading.Timer(1.0, stop.set).start()  # the driver gives up on the sync
    started = time.monotonic()
    with pytest.raises(SyncAborted, match="sending bucket"):
        for index, bucket in enumerate(plan):
            tx.send(index, [torch.ones(m.numel) for m in bucket], should_stop=stop.is_set)
    took = time.monotonic() - started
    RETIRED.retire(tx)
    for t in threads:
        t.join(10)
    RETIRED.retire(lost[0])
    assert took < 5, took  # not the group's 60 s timeout
    assert isinstance(outcome.get("rx1"), SyncAborted)
