"""How the student's weights leave a learner rank: sync buckets, the broadcast to the rollout
workers, the object-store hand-off, the checksum of what was sent, and the HF export.

`LearnerWeights` is a part of `LearnerWorker` (its base class): it reads the worker's `engine`,
`cfg`, `rank` and `buckets`. Under ZeRO-3 every rank must take part in each gather.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from eopd_ray.config import Config
from eopd_ray.core.weight_checksum import combine, weights_checksum
from eopd_ray.roles.cancellation import cancelled
from eopd_ray.roles.weight_sync import RetiredGroups, TensorMeta, WeightSender
from eopd_ray.storage.run_storage import RunStorage


def export_hf_model(gathered, buckets, rank: int, source_dir: str, directory: str) -> None:
    """Write gathered buckets as `model-0000i-of-0000n.safetensors` plus the index, and copy the
    source model's config, generation config and tokenizer files; rename into place at the end."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(directory)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.")) if rank == 0 else None
    weight_map, total = {}, 0
    for index, tensors in gathered:
        if tmp is None:
            continue
        name = f"model-{index + 1:05d}-of-{len(buckets):05d}.safetensors"
        named = {m.name: t.contiguous() for m, t in zip(buckets[index], tensors, strict=True)}
        save_file(named, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(named, name))
        total += sum(t.numel() * t.element_size() for t in named.values())
    if tmp is None:
        return
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    for src in Path(source_dir).iterdir():
        # Not the weights, and not hidden files (a cache's bookkeeping, an editor's swap file).
        if src.is_file() and not src.name.startswith(("model", ".")) and src.suffix != ".bin":
            shutil.copy2(src, tmp / src.name)  # config, generation config, tokenizer files
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


class LearnerWeights:
    """The weight-moving half of `LearnerWorker` (see the module docstring)."""

    cfg: Config
    rank: int
    engine: object
    buckets: list[list[TensorMeta]]
    sender: WeightSender | None
    _retired_groups: RetiredGroups
    _sent_checksum: int | None
    _gathered_checksum: int

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The Hugging Face names (those of the checkpoint files vLLM and export_hf use)."""
        return list(self.engine.module.hf.named_parameters())

    def _parameter_metas(self) -> list[TensorMeta]:
        metas = []
        for name, p in self._named_parameters():
            shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 params report numel 0
            metas.append(TensorMeta(name, shape, self.cfg.model.dtype))
        return metas

    def sync_buckets(self) -> list[list[TensorMeta]]:
        return self.buckets

    def join_sync_group(self, address: str, port: int, world_size: int) -> None:
        """Rank 0 only: host the weight-broadcast group with the rollout workers (a new group
        after a rollout worker was lost; the old one is retired, see `RetiredGroups`)."""
        self._retired_groups.retire(self.sender)
        self.sender = WeightSender.connect(
            address, port, world_size, self.buckets, self.cfg.sync.timeout_s
        )

    def _gathered_buckets(self) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Full parameters bucket by bucket. Under ZeRO-3 every rank must run this (each bucket
        is an all-gather every rank joins); other stages hold full parameters on every rank."""
        import deepspeed

        params = dict(self._named_parameters())
        self._gathered_checksum, self._checksum_s = 0, 0.0
        for index, bucket in enumerate(self.buckets):
            tensors = [params[m.name] for m in bucket]
            gather = (
                deepspeed.zero.GatheredParameters(tensors, modifier_rank=None)
                if self.cfg.learner.zero_stage == 3
                else contextlib.nullcontext()
            )
            with gather:
                wire = [
                    t.detach().to(getattr(torch, m.dtype))
                    for t, m in zip(tensors, bucket, strict=True)
                ]
                out = [t.to("cpu") for t in wire]
                if self.cfg.learner.zero_stage == 3:  # the gathered storage is freed on exit
                    out = [
                        c.clone() if c.data_ptr() == t.data_ptr() else c
                        for c, t in zip(out, tensors, strict=True)
                    ]
                yield index, out
                # Checksummed where the weights are (the GPU: fast), AFTER the caller sent the
                # bucket: nothing needs the sum before the driver compares it with the engines',
                # so it runs while they receive, reload and checksum (0.28 s of a 1.1 s sync on
                # CPU for a 99M-parameter student, off the sync's critical path).
                started = time.perf_counter()
                self._gathered_checksum += weights_checksum(wire)
                self._checksum_s += time.perf_counter() - started

    def broadcast_weights(self) -> dict[str, float]:
        """Collective transport: rank 0 broadcasts every bucket. Returns the buckets sent and
        the seconds spent (`send_s` in the broadcasts, `checksum_s` checksumming what is sent,
        `gather_s` the rest: gathering and copying to the host).
        A failed send (a rollout worker lost mid-broadcast) stops the sending but not the
        gathering: under ZeRO-3 every rank must join every bucket's gather, or the other ranks
        would wait in it and refuse the redone sync; the error is raised at the end."""
        sent, failed, send_s, started = 0, None, 0.0, time.perf_counter()
        for index, tensors in self._gathered_buckets():
            if self.rank == 0 and failed is None:
                assert self.sender is not None, "join_sync_group was not called on rank 0"
                try:
                    sending = time.perf_counter()
                    self.sender.send(index, tensors, should_stop=cancelled)
                    send_s += time.perf_counter() - sending
                    sent += 1
                except RuntimeError as exc:  # gloo: a peer is gone; SyncAborted: cancelled
                    failed = exc
            if self.cfg.learner.zero_stage != 3 and self.rank != 0:
                break  # nothing to gather on other ranks
        if failed is not None:
            raise failed
        self._sent_checksum = combine([self._gathered_checksum]) if self.rank == 0 else None
        total = time.perf_counter() - started
        return {
            "buckets": float(sent),
            "send_s": send_s,
            "checksum_s": self._checksum_s,
            "gather_s": total - send_s - self._checksum_s,
        }

    def sent_weights_checksum(self) -> int | None:
        """Rank 0: eopd_ray.core.weight_checksum of the weights of the last sync, as sent (in
        model.dtype); every rollout engine must read the same back. Other ranks: None."""
        return self._sent_checksum

    def weight_buckets(self) -> list[list[tuple[str, torch.Tensor]]]:
        """Object-store transport: the buckets as (name, tensor) lists; empty except on rank 0.
        Under ZeRO-3 every rank must call it (the gathers are collective)."""
        if self.rank != 0 and self.cfg.learner.zero_stage != 3:
            return []
        out = []
        for index, tensors in self._gathered_buckets():
            names = [m.name for m in self.buckets[index]]
            out.append(list(zip(names, tensors, strict=True)))
        self._sent_checksum = combine([self._gathered_checksum]) if self.rank == 0 else None
        return out if self.rank == 0 else []

    def export_hf(self, store: RunStorage, rel: str = "hf") -> None:
        """The student as a Hugging Face model directory (sharded safetensors, one shard per sync
        bucket, config and tokenizer) at `rel`, written atomically by rank 0. Every rank must
        call it under ZeRO-3 (the gathers are collective)."""
        target = store.local_path(rel) if store.is_local else store.staging(rel) / "hf"
        export_hf_model(
            self._gathered_buckets(),
            self.buckets,
            self.rank,
            self.cfg.model.student_path,
            str(target),
        )
        if self.rank == 0 and not store.is_local:
            store.delete(rel)
            store.publish(target, rel)
