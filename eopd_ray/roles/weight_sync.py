"""Moving student weights from learner rank 0 to every rollout worker, in buckets.

Transports (config `sync.transport`):
- `collective` (default): a dedicated process group whose rank 0 is learner rank 0 and whose
  ranks 1..R are the rollout workers; gloo on CPU. The parameter list (names, shapes, dtypes)
  and its split into buckets are agreed once at start-up; each step then broadcasts one flat
  buffer per bucket (`sync.bucket_bytes`): never one call per parameter.
- `object_store`: learner rank 0 returns the buckets, the driver hands the same object to every
  rollout worker. The fallback when no collective group can be formed.

This module holds the pure torch part (no Ray): bucket planning, flattening, and the group.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorMeta:
    name: str  # Hugging Face checkpoint name, what vLLM's reload_weights expects
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32"

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Split the parameters, in order, into buckets of at most `bucket_bytes` (a tensor larger
    than that gets a bucket of its own) and of one dtype each."""
    buckets: list[list[TensorMeta]] = []
    size = 0
    for meta in metas:
        current = buckets[-1] if buckets else None
        if (
            current is None
            or current[0].dtype != meta.dtype
            or (size + meta.nbytes > bucket_bytes and size > 0)
        ):
            buckets.append([meta])
            size = meta.nbytes
        else:
            current.append(meta)
            size += meta.nbytes
    return buckets


def flatten(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors], out=out)


def _flat_buffer(bucket: Sequence[TensorMeta], device: torch.device | str = "cpu") -> torch.Tensor:
    numel = sum(m.numel for m in bucket)
    return torch.empty(numel, dtype=getattr(torch, bucket[0].dtype), device=device)


def unflatten(flat: torch.Tensor, bucket: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    out, offset = [], 0
    for meta in bucket:
        out.append((meta.name, flat[offset : offset + meta.numel].view(meta.shape)))
        offset += meta.numel
    return out


class SyncAborted(RuntimeError):
    """A weight sync's broadcast was given up on (the driver cancelled it: a peer was lost)."""


# How often a waiting end looks at `should_stop` (a bucket waits at most this much longer).
_POLL_MAX_S = 0.02


def _wait(work, should_stop: Callable[[], bool] | None, what: str) -> None:
    """Wait for one broadcast; with `should_stop`, poll so that a sync the driver gave up on
    (a peer lost between buckets, which gloo itself notices only at its timeout) ends within
    a fraction of a second. The op's own error, if any, is raised by the final wait()."""
    if should_stop is not None:
        pause = 1e-4
        while not work.is_completed():
            if should_stop():
                raise SyncAborted(f"{what}: abandoned (the driver cancelled the weight sync)")
            time.sleep(pause)
            pause = min(2 * pause, _POLL_MAX_S)
    work.wait()


def _gloo_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A process group of its own (not torch's default group, which DeepSpeed owns)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


class WeightSender:
    """Learner rank 0's end: broadcasts each bucket as one flat buffer.

    The flat buffers are allocated once and reused every step (a fresh multi-MiB allocation per
    bucket and step costs page faults comparable to the copy itself)."""

    def __init__(self, group, buckets: list[list[TensorMeta]]) -> None:
        self.group, self.buckets = group, buckets
        self._flats: list[torch.Tensor | None] = [None] * len(buckets)

    @classmethod
    def connect(cls, address: str, port: int, world_size: int, buckets, timeout_s: float):
        return cls(_gloo_group(address, port, 0, world_size, timeout_s), buckets)

    def send(
        self,
        bucket_index: int,
        tensors: Sequence[torch.Tensor],
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        flat = self._flats[bucket_index]
        if flat is None or flat.device != tensors[0].device:
            flat = self._flats[bucket_index] = _flat_buffer(
                self.buckets[bucket_index], tensors[0].device
            )
        work = self.group.broadcast(flatten(tensors, out=flat), 0)
        _wait(work, should_stop, f"sending bucket {bucket_index}")


class WeightReceiver:
    """A rollout worker's end: receives the buckets in the agreed order, into buffers reused
    every step (the consumer copies each bucket into its engine before the next receive)."""

    def __init__(self, group, buckets: list[list[TensorMeta]]) -> None:
        self.group, self.buckets = group, buckets
        self._flats = [_flat_buffer(bucket) for bucket in buckets]

    @classmethod
    def connect(cls, address: str, port: int, rank: int, world_size: int, buckets, timeout_s):
        return cls(_gloo_group(address, port, rank, world_size, timeout_s), buckets)

    def receive(
        self, should_stop: Callable[[], bool] | None = None
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        for index, (bucket, flat) in enumerate(zip(self.buckets, self._flats, strict=True)):
            _wait(self.group.broadcast(flat, 0), should_stop, f"receiving bucket {index}")
            yield unflatten(flat, bucket)


class RetiredGroups:
    """Process groups replaced by a new one. A group whose last broadcast was abandoned still
    has that op in its worker thread until gloo's own timeout (sync.timeout_s), and destroying
    the group joins that thread: the process would block for minutes. They are kept, never
    destroyed (a few per run: one per rejoin), without their buffers."""

    def __init__(self) -> None:
        self._groups: list = []

    def retire(self, end: WeightSender | WeightReceiver | None) -> None:
        if end is not None:
            self._groups.append(end.group)
            end._flats = []
