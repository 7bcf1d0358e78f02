"""The packed expert layout (kernels/packed.py): repack is exactly invertible, and every code
sits where the module doc says, on small shapes covering odd group counts, partial words and
the extreme codes of each format."""

from __future__ import annotations

import itertools

import pytest
import torch

from local_backend.kernels.packed import OFFSET, pack_k_for, repack, unpack, values_per_word
from local_backend.kernels.quant import QuantizedWeight, quantize_int4, quantize_int8


def int4_weight(lead: tuple[int, ...], n: int, k: int, group: int) -> QuantizedWeight:
    """Codes cycling through all 16 values at shifted phases per row (so every value lands in
    every nibble position), random fp16 scales."""
    index = torch.arange(n * k).view(n, k) + torch.arange(n)[:, None] * 5
    nibbles = (index % 16).to(torch.uint8).expand(*lead, n, k)  # stored code = signed + 8
    packed = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).contiguous()
    scales = (torch.rand(*lead, n, k // group) + 0.25).to(torch.float16)
    return QuantizedWeight("int4", packed, scales, group, k)


SHAPES_INT4 = [  # (leading dims, N, K, group): odd group counts, one row, stacked experts
    ((), 1, 16, 16),
    ((), 3, 48, 16),  # 3 groups
    ((), 5, 80, 16),  # 5 groups
    ((2,), 4, 96, 32),  # 3 groups of 32, two experts
    ((3,), 2, 384, 128),  # 3 groups of 128 (the real group), three experts
    ((2, 2), 3, 64, 64),  # two leading dims
]


@pytest.mark.parametrize(("lead", "n", "k", "group"), SHAPES_INT4)
def test_int4_round_trip_and_positions(lead: tuple[int, ...], n: int, k: int, group: int) -> None:
    q = int4_weight(lead, n, k, group)
    p = repack(q)
    assert p.codes.dtype == torch.int32 and p.pack_k == group
    assert p.codes.shape == (*lead, k // group, n, group // 8)
    assert p.scales.shape == (*lead, k // group, n) and p.nbytes == q.nbytes
    back = unpack(p)
    assert torch.equal(back.qweight, q.qweight) and torch.equal(back.scales, q.scales)
    assert torch.equal(p.dequantize(), q.dequantize())
    # every code by the documented formula: field i of word j of (s, n) is k = s*PK + i*W + j
    signed = (
        torch.stack(((q.qweight & 0xF), (q.qweight >> 4)), dim=-1).flatten(-2).long() - 8
    )  # [..., N, K] in k order
    words = p.codes.long() & 0xFFFFFFFF
    width = group // 8
    for s, row, i, j in itertools.product(range(k // group), range(n), range(8), range(width)):
        field = (words[..., s, row, j] >> (4 * i)) & 0xF
        expected = signed[..., row, s * group + i * width + j] + OFFSET["int4"]
        assert torch.equal(field, expected), (s, row, i, j)
        assert torch.equal(p.scales[..., s, row], q.scales[..., row, s])


SHAPES_INT8 = [((), 1, 16), ((), 3, 48), ((2,), 5, 80), ((3,), 2, 384), ((2,), 4, 256)]


@pytest.mark.parametrize(("lead", "n", "k"), SHAPES_INT8)
def test_int8_round_trip_and_positions(lead: tuple[int, ...], n: int, k: int) -> None:
    w = torch.randn(*lead, n, k)
    w[..., 0, 0] = 10.0  # code 127 in row 0
    w[..., 0, 1] = -10.0  # code -127
    q = quantize_int8(w)
    p = repack(q)
    step = pack_k_for("int8", k, q.group_size)
    assert p.pack_k == step and k % step == 0
    assert p.codes.shape == (*lead, k // step, n, step // 4)
    assert torch.equal(p.scales, q.scales) and p.nbytes == q.nbytes
    back = unpack(p)
    assert torch.equal(back.qweight, q.qweight)
    assert torch.equal(p.dequantize(), q.dequantize())
    words = p.codes.long() & 0xFFFFFFFF
    width = step // 4
    for s, row, i, j in itertools.product(range(k // step), range(n), range(4), range(width)):
        field = (words[..., s, row, j] >> (8 * i)) & 0xFF
        expected = q.qweight[..., row, s * step + i * width + j].long() + OFFSET["int8"]
        assert torch.equal(field, expected), (s, row, i, j)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_expert_view_and_sign_bit(fmt: str) -> None:
    """Words whose top field is >= 8 (int4) / >= 128 (int8) are negative int32: still exact."""
    w = torch.randn(3, 8, 128)
    q = quantize_int4(w, group_size=64) if fmt == "int4" else quantize_int8(w)
    p = repack(q)
    assert bool((p.codes < 0).any())  # the sign bit is in use
    for e in range(3):
        assert torch.equal(p.expert(e).dequantize(), p.dequantize()[e])
    assert values_per_word(fmt) * p.codes.shape[-1] == p.pack_k


def test_repack_rejects_steps_that_split_words_or_groups() -> None:
    q4 = quantize_int4(torch.randn(4, 64), group_size=32)
    with pytest.raises(ValueError, match="group"):
        repack(q4, pack_k=64)
    q8 = quantize_int8(torch.randn(4, 48))
    with pytest.raises(ValueError, match="whole 32-bit words"):
        repack(q8, pack_k=32)
