"""Wire types: the only data that crosses a Ray actor boundary.

Shape legend (used across eopd_ray):
    B  sequences in the batch
    P  prompt tokens (right-padded to the longest prompt)
    T  response tokens (right-padded to the longest response)
    K  teacher top-k

Ragged prompts and responses travel right-padded with a boolean mask (True = a real token).
Padding values are not meaningful and consumers must mask them; ids are padded with 0 so they
stay valid indices. Every tensor is a CPU tensor. Construction validates shapes and dtypes, so
a malformed batch fails where it is made, not deep inside the loss.

Serialization is cheap: pickling turns each tensor into a numpy array (zero-copy views), which
Ray ships as out-of-band buffers through its object store; unpickling wraps them back without
copying. Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from eopd_ray.errors import BatchError

FINISH_REASONS = ("stop", "length", "abort")


def _check(name: str, tensor: Any, dtype: torch.dtype, shape: tuple[int | None, ...]) -> None:
    """Raise BatchError unless `tensor` is a CPU tensor of `dtype` matching `shape` (None = any)."""
    if not isinstance(tensor, torch.Tensor):
        raise BatchError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise BatchError(f"{name}: expected dtype {dtype}, got {tensor.dtype}")
    if tensor.device.type != "cpu":
        raise BatchError(f"{name}: wire tensors live on the CPU, got device {tensor.device}")
    if tensor.dim() != len(shape) or any(
        want is not None and got != want for got, want in zip(tensor.shape, shape, strict=True)
    ):
        raise BatchError(f"{name}: expected shape {_fmt(shape)}, got {tuple(tensor.shape)}")


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


class _Wire:
    """Shared pickling, sizing and row selection of the wire dataclasses."""

    _tensor_fields: ClassVar[tuple[str, ...]]

    def __reduce__(self):
        state = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            state[f.name] = value.numpy() if isinstance(value, torch.Tensor) else value
        return (_rebuild, (type(self), state))

    @property
    def nbytes(self) -> int:
        """Bytes of tensor payload (what crosses the wire, less small metadata)."""
        return sum(getattr(self, n).nbytes for n in self._tensor_fields)

    def select(self, rows: Sequence[int] | torch.Tensor):
        """A new batch with only `rows` (in that order)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        changes = {n: getattr(self, n).index_select(0, index) for n in self._tensor_fields}
        changes.update(self._select_extra(index.tolist()))
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def split(self, num_shards: int) -> list:
        """`num_shards` contiguous, near-equal shards (for data-parallel learners)."""
        n = self.num_sequences
        if not 1 <= num_shards <= n:
            raise BatchError(f"cannot split {n} sequences into {num_shards} shards")
        bounds = [round(i * n / num_shards) for i in range(num_shards + 1)]
        return [self.select(range(a, b)) for a, b in itertools.pairwise(bounds)]

    def _select_extra(self, rows: list[int]) -> dict[str, Any]:
        return {}

    @classmethod
    def _joined_tensors(cls, parts: Sequence[_Wire]) -> dict[str, torch.Tensor]:
        return {n: _pad_cat([getattr(p, n) for p in parts]) for n in cls._tensor_fields}


def _rebuild(cls: type, state: dict[str, Any]):
    with warnings.catch_warnings():
        # Ray hands back read-only zero-copy buffers; wire tensors are never written in place.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return cls(
            **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}
        )


def _pad_cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0; 2-D and wider tensors are right-padded along dim 1 with zeros
    (False for masks), the wire types' padding value."""
    if tensors[0].dim() < 2:
        return torch.cat(list(tensors))
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        if t.shape[1] < width:
            t = torch.cat([t, t.new_zeros((t.shape[0], width - t.shape[1], *t.shape[2:]))], dim=1)
        padded.append(t)
    return torch.cat(padded, dim=0)


@dataclass(frozen=True, eq=False)
class RolloutBatch(_Wire):
    """What a RolloutWorker returns: sampled responses and how they were sampled."""

    prompt_ids: torch.Tensor  # (B, P) int64, right-padded with 0
    prompt_mask: torch.Tensor  # (B, P) bool, True = real prompt token
    response_ids: torch.Tensor  # (B, T) int64, right-padded with 0
    response_mask: torch.Tensor  # (B, T) bool, True = real response token
    sampler_logprobs: torch.Tensor  # (B, T) float32, the sampler's log pi_old(y_t); 0 at padding
    prompt_index: torch.Tensor  # (B,) int64, position of the prompt in the data stream
    finish_reason: tuple[str, ...]  # (B,) one of FINISH_REASONS
    weight_version: int  # student weight version that sampled every row

    _tensor_fields: ClassVar[tuple[str, ...]] = (
        "prompt_ids",
        "prompt_mask",
        "response_ids",
        "response_mask",
        "sampler_logprobs",
        "prompt_index",
    )

    def __post_init__(self) -> None:
        if self.prompt_ids.dim() != 2 or self.response_ids.dim() != 2:
            raise BatchError(
                f"prompt_ids and response_ids must be 2-D (B, P) / (B, T); got "
                f"{tuple(self.prompt_ids.shape)} and {tuple(self.response_ids.shape)}"
            )
        b, p = self.prompt_ids.shape
        t = self.response_ids.shape[1]
        _check("prompt_ids", self.prompt_ids, torch.int64, (b, p))
        _check("prompt_mask", self.prompt_mask, torch.bool, (b, p))
        _check("response_ids", self.response_ids, torch.int64, (b, t))
        _check("response_mask", self.response_mask, torch.bool, (b, t))
        _check("sampler_logprobs", self.sampler_logprobs, torch.float32, (b, t))
        _check("prompt_index", self.prompt_index, torch.int64, (b,))
        object.__setattr__(self, "finish_reason", tuple(self.finish_reason))
        if len(self.finish_reason) != b:
            raise BatchError(f"finish_reason: expected {b} entries, got {len(self.finish_reason)}")
        unknown = set(self.finish_reason) - set(FINISH_REASONS)
        if unknown:
            raise BatchError(
                f"finish_reason: unknown values {sorted(unknown)}; expected one of {FINISH_REASONS}"
            )
        if not isinstance(self.weight_version, int) or self.weight_version < 0:
            raise BatchError(f"weight_version: expected an int >= 0, got {self.weight_version!r}")

    @property
    def num_sequences(self) -> int:
        return self.response_ids.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def _select_extra(self, rows: list[int]) -> dict[str, Any]:
        return {"finish_reason": tuple(self.finish_reason[i] for i in rows)}

    @property
    def sequence_lengths(self) -> list[int]:
        """Prompt + response tokens of each row: what a forward pass puts through the model."""
        return (self.prompt_mask.sum(1) + self.response_mask.sum(1)).tolist()

    def trimmed(self) -> RolloutBatch:
        """The batch cut to its own longest prompt and response (at least one column each):
        after selecting a few rows of a step, the step's padding columns are dead weight."""
        p = max(1, int(self.prompt_mask.sum(1).max()))
        t = max(1, int(self.response_mask.sum(1).max()))
        return dataclasses.replace(
            self,
            prompt_ids=self.prompt_ids[:, :p],
            prompt_mask=self.prompt_mask[:, :p],
            response_ids=self.response_ids[:, :t],
            response_mask=self.response_mask[:, :t],
            sampler_logprobs=self.sampler_logprobs[:, :t],
        )

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Join batches from several workers; they must share one weight version."""
        if not batches:
            raise BatchError("cannot concatenate zero rollout batches")
        versions = {b.weight_version for b in batches}
        if len(versions) != 1:
            raise BatchError(f"rollout batches carry different weight versions {sorted(versions)}")
        return cls(
            **cls._joined_tensors(batches),
            finish_reason=tuple(r for b in batches for r in b.finish_reason),
            weight_version=versions.pop(),
        )


@dataclass(frozen=True, eq=False)
class TeacherScores(_Wire):
    """What a TeacherWorker returns for every response position of a RolloutBatch.

    Position t describes the teacher's distribution that predicts response token t. Only
    O(T * K) numbers per sequence: K * 8 + 8 bytes per token, never (T, V) logits.
    """

    token_logprobs: torch.Tensor  # (B, T) float32, log pi_te(y_t | c_t)
    entropy: torch.Tensor  # (B, T) float32, full-vocabulary entropy H_t in nats
    topk_ids: torch.Tensor  # (B, T, K) int32, the teacher's top-K token ids
    topk_logprobs: torch.Tensor  # (B, T, K) float32, raw full-vocab logprobs (not renormalized)
    entropy_is_exact: bool = True  # False when estimated from the top-K plus tail (vLLM engine)

    _tensor_fields: ClassVar[tuple[str, ...]] = (
        "token_logprobs",
        "entropy",
        "topk_ids",
        "topk_logprobs",
    )

    def __post_init__(self) -> None:
        if self.topk_ids.dim() != 3:
            raise BatchError(
                f"topk_ids: expected shape (B, T, K), got {tuple(self.topk_ids.shape)}"
            )
        b, t, k = self.topk_ids.shape
        _check("token_logprobs", self.token_logprobs, torch.float32, (b, t))
        _check("entropy", self.entropy, torch.float32, (b, t))
        _check("topk_ids", self.topk_ids, torch.int32, (b, t, k))
        _check("topk_logprobs", self.topk_logprobs, torch.float32, (b, t, k))

    @property
    def num_sequences(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[2]

    def narrowed(self, num_positions: int) -> TeacherScores:
        """The first `num_positions` response positions (to match a trimmed RolloutBatch)."""
        t = num_positions
        return dataclasses.replace(
            self,
            token_logprobs=self.token_logprobs[:, :t],
            entropy=self.entropy[:, :t],
            topk_ids=self.topk_ids[:, :t],
            topk_logprobs=self.topk_logprobs[:, :t],
        )

    def check_matches(self, batch: RolloutBatch) -> None:
        """Raise BatchError unless these scores cover exactly `batch`'s response positions."""
        want = tuple(batch.response_ids.shape)
        if tuple(self.token_logprobs.shape) != want:
            raise BatchError(
                f"teacher scores cover shape {tuple(self.token_logprobs.shape)} but "
                f"the rollout batch's responses are {want}"
            )

    @classmethod
    def concat(cls, parts: Sequence[TeacherScores]) -> TeacherScores:
        if not parts:
            raise BatchError("cannot concatenate zero teacher score batches")
        ks = {p.top_k for p in parts}
        if len(ks) != 1:
            raise BatchError(f"teacher score batches have different top-k {sorted(ks)}")
        return cls(
            **cls._joined_tensors(parts),
            entropy_is_exact=all(p.entropy_is_exact for p in parts),
        )
