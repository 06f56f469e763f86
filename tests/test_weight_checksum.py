"""eopd_ray.core.weight_checksum: exact against a pure-Python brute force, blind to order and to how
tensors are fused or padded with zeros, and sees a single bf16 ulp (review finding 7: the probe
could not tell an engine one version behind from a fresh one in bf16)."""

from __future__ import annotations

import pytest
import torch

from eopd_ray.core.weight_checksum import _table, combine, tensor_checksum, weights_checksum


def brute_force(tensors) -> int:
    """Element by element, in Python integers."""
    table = _table(torch.device("cpu")).tolist()
    total = 0
    for t in tensors:
        size = t.element_size()
        raw = t.detach().contiguous().reshape(-1).view(torch.int16).tolist()
        per = size // 2
        for i, bits in enumerate(raw):
            total += table[i % per][bits & 0xFFFF]
    return total % 2**64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_brute_force(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g).to(dtype) for shape in ((7, 5), (13,), (2, 3, 4))]
    assert weights_checksum(tensors) == brute_force(tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tensor_of_several_chunks_matches_the_brute_force(dtype):
    """Partial sums over cache-sized chunks: the chunk edges lose and repeat nothing."""
    from eopd_ray.core.weight_checksum import _chunk

    n = 2 * _chunk(torch.device("cpu")) // (4 // torch.empty((), dtype=dtype).element_size()) + 7
    tensor = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert tensor_checksum(tensor) == brute_force([tensor])


def test_blind_to_order_fusion_and_zero_padding():
    """The learner sends q, k, v and gate, up as HF tensors; vLLM holds qkv_proj and
    gate_up_proj, and pads the vocabulary rows with zeros."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(8, 4, generator=g, dtype=torch.float32).bfloat16() for _ in range(3))
    emb = torch.randn(10, 4, generator=g).bfloat16()
    hf = [emb, q, k, v]
    padded = torch.cat([emb, torch.zeros(6, 4, dtype=torch.bfloat16)])
    engine = [torch.cat([q, k, v]), padded]
    assert weights_checksum(hf) == weights_checksum(engine) == weights_checksum(hf[::-1])
    assert combine([tensor_checksum(t) for t in hf]) == weights_checksum(hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_ulp_in_one_element_changes_it(dtype):
    """What one update at lr 1e-6 does to a bf16 model: most weights do not move at all, a few
    move by one ulp. The checksum differs; the log-prob probe cannot see it."""
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(1000, generator=g).to(dtype)
    bits = weights.view(torch.int16 if dtype == torch.bfloat16 else torch.int32).clone()
    bits[417] += 1  # the next representable value
    nudged = bits.view(dtype)
    assert not torch.equal(weights, nudged)
    assert weights_checksum([weights]) != weights_checksum([nudged])


def test_refuses_element_sizes_it_cannot_read():
    with pytest.raises(ValueError, match="2- or 4-byte"):
        weights_checksum([torch.zeros(3, dtype=torch.float64)])
