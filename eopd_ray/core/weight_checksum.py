"""An exact, order-free checksum of a model's weights: which version an engine holds.

    weights_checksum(tensor for _, tensor in model.named_parameters())   -> int (64 bits)

Why: the weight-sync probe compares log-probs within a tolerance, and one step at the paper's
learning rate moves most bf16 weights by less than an ulp, so an engine one or several versions
behind scores the probe as well as a fresh one. This checksum tells versions apart bit for bit.

How: every element's bit pattern, cut into 16-bit halves, picks a fixed pseudo-random 40-bit
number per half (a table of 65,536 per half position, seeded with a constant); the checksum is
their sum modulo 2^64. Sums do not depend on order or grouping, so the learner's Hugging Face
tensors and vLLM's fused ones (q/k/v -> `qkv_proj`, gate/up -> `gate_up_proj`) give the same
number; +0.0 maps to 0, so vocabulary rows vLLM pads with zeros add nothing. Any changed
element changes the sum (unless two changes cancel exactly: chance ~2^-40). What it cannot see
is elements moved within the multiset (a transposed or permuted tensor): the log-prob probe is
there for that. Exact integer arithmetic: the same on CPU and GPU, whatever the order.

Pure torch: imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_HALVES = 2  # 16-bit halves of the widest element handled (fp32)
_TABLE_SEED = 20261204
_MASK = (1 << 64) - 1

_tables: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    """(2, 65536) int64 on `device`; entry 0 (+0.0's halves) is 0."""
    if device not in _tables:
        g = torch.Generator().manual_seed(_TABLE_SEED)
        table = torch.randint(1, 1 << 40, (_HALVES, 1 << 16), generator=g, dtype=torch.int64)
        table[:, 0] = 0
        _tables[device] = table.to(device)
    return _tables[device]


def _chunk(device: torch.device) -> int:
    """Elements per partial sum. On CPU, small enough that one chunk's indices and lookups stay
    in cache (2^18: 13x faster than 2^22 on 26M fp32 elements, 0.05 s against 0.69 s on one
    core; docs/performance.md); on an accelerator, large (each partial sum is a host sync)."""
    return 1 << 18 if device.type == "cpu" else 1 << 22  # 2^22 * 2^40 < 2^63: no overflow


def tensor_checksum(tensor: torch.Tensor) -> int:
    """The checksum of one tensor's elements (2- or 4-byte floats), modulo 2^64."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    size = flat.element_size()
    if size not in (2, 4):
        raise ValueError(f"weights_checksum takes 2- or 4-byte elements, not {flat.dtype}")
    halves = flat.view(torch.uint16).reshape(-1, size // 2)  # (n, 1 or 2) 16-bit halves
    table = _table(flat.device)
    chunk = _chunk(flat.device)
    total = 0
    for start in range(0, halves.shape[0], chunk):
        block = halves[start : start + chunk].to(torch.int32)  # indices 0..65535
        for half in range(block.shape[1]):
            total += int(table[half].index_select(0, block[:, half]).sum())
    return total & _MASK


def weights_checksum(tensors: Iterable[torch.Tensor]) -> int:
    """The checksum of all elements of `tensors`, as if they were one multiset."""
    return sum(tensor_checksum(t) for t in tensors) & _MASK


def combine(checksums: Iterable[int]) -> int:
    """The checksum of the union of the parts whose checksums are given."""
    return sum(checksums) & _MASK
