"""Bucket planning and the standalone gloo broadcast group (two threads, one process)."""

from __future__ import annotations

import socket
import threading

import torch

from eopd_ray.roles.weight_sync import TensorMeta, WeightReceiver, WeightSender, plan_buckets


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
