"""The expert layout the packed MoE kernels read: repacked once, at load, from QuantizedWeight.

    repack(q: QuantizedWeight) -> PackedWeight      pure torch; unpack(repack(q)) == q exactly
    unpack(p: PackedWeight) -> QuantizedWeight      the inverse (torch path, tests)

Layout of a [..., N, K] matrix, in K steps of PK inputs (PK = the int4 group size; for int8 the
same rule picks 128 where it divides K):

    codes   int32 [..., K // PK, N, PK // V]   V = values per 32-bit word: 8 (int4) or 4 (int8)
    scales  fp16  [..., K // PK, N] (int4: one per group = per step) | [..., N] (int8)

Word j of row n in step s holds, in its bit field i (4 or 8 bits wide, i = 0 the lowest),
the code of input k = s * PK + i * (PK // V) + j, stored unsigned with an offset (int4 + 8,
int8 + 128). Why this order:
- one step of a BLOCK_N tile is BLOCK_N * PK // 2 (int4) or BLOCK_N * PK (int8) contiguous
  bytes: rows of a step are adjacent, so a tile is one run, whatever BLOCK_N the config picks;
- field i of every word of a row is a contiguous K slice (i * PK // V ...), so unpacking is a
  shift and a mask per field, dotted against the matching slice of x: no reshape, no gather,
  each byte loaded once;
- a step's group scales are one contiguous [BLOCK_N] run in the same step-major order as its
  codes ("beside their codes"), read once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .quant import QuantizedWeight, int4_group_size, unpack_int4

OFFSET = {"int4": 8, "int8": 128}  # stored code = signed code + OFFSET
BITS = {"int4": 4, "int8": 8}


def values_per_word(fmt: str) -> int:
    return 32 // BITS[fmt]


def pack_k_for(fmt: str, in_features: int, group_size: int) -> int:
    """Inputs per step: the int4 group (one scale per step); for int8 the largest power of two
    <= 128 dividing K (>= 16, so a step's fields are at least 4 wide)."""
    return group_size if fmt == "int4" else int4_group_size(in_features)


@dataclass
class PackedWeight:
    """A quantized [..., N, K] weight in the packed kernels' layout (see the module doc)."""

    format: Literal["int8", "int4"]
    codes: torch.Tensor  # int32 [..., K // PK, N, PK // V]
    scales: torch.Tensor  # fp16 [..., K // PK, N] (int4) | [..., N] (int8)
    group_size: int
    pack_k: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[-2])

    @property
    def n_steps(self) -> int:
        return int(self.codes.shape[-3])

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def expert(self, index: int) -> PackedWeight:
        """Expert `index` of a stacked [E, ...] weight."""
        return PackedWeight(
            self.format,
            self.codes[index],
            self.scales[index],
            self.group_size,
            self.pack_k,
            self.in_features,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [..., N, K] matrix (straight from the packed words, in fp32 then `dtype`:
        the same numbers as QuantizedWeight.dequantize, at about its cost)."""
        bits = BITS[self.format]
        shifts = torch.arange(values_per_word(self.format), device=self.codes.device) * bits
        shifts = shifts.to(torch.int32)
        fields = (self.codes.unsqueeze(-2) >> shifts[:, None]) & ((1 << bits) - 1)
        values = fields.flatten(-2).float() - OFFSET[self.format]  # [..., S, N, PK]
        if self.format == "int4":
            values = values * self.scales.float()[..., None]
        dense = values.transpose(-3, -2).flatten(-2)  # [..., N, K]
        if self.format == "int8":
            dense = dense * self.scales.float()[..., None]
        return dense.to(dtype)


def _signed_codes(q: QuantizedWeight) -> torch.Tensor:
    """int32 [N, K] signed codes of a single-matrix QuantizedWeight."""
    if q.format == "int4":
        return unpack_int4(q.qweight).to(torch.int32)
    return q.qweight.to(torch.int32)


def _expert(q: QuantizedWeight, index: int) -> QuantizedWeight:
    return QuantizedWeight(q.format, q.qweight[index], q.scales[index], q.group_size, q.in_features)


def repack(q: QuantizedWeight, pack_k: int | None = None) -> PackedWeight:
    """The packed layout of `q` (a pure function: `q` is not modified).

    A stacked [E, ...] weight is repacked one matrix at a time in int32, so temporaries stay
    a few times one expert's codes (at load, beside a nearly full device), never the stack's.
    """
    k = q.in_features
    step = pack_k or pack_k_for(q.format, k, q.group_size)
    per_word = values_per_word(q.format)
    if k % step or step % per_word:
        raise ValueError(f"pack step {step} must divide K = {k} into whole 32-bit words")
    if q.format == "int4" and step != q.group_size:
        raise ValueError(f"int4 steps are the quantization group ({q.group_size}), not {step}")
    if q.qweight.dim() > 2:
        parts = [repack(_expert(q, i), step) for i in range(q.qweight.shape[0])]
        return PackedWeight(
            q.format,
            torch.stack([p.codes for p in parts]),
            torch.stack([p.scales for p in parts]),
            q.group_size,
            step,
            k,
        )
    width = step // per_word  # words per row per step
    bits = BITS[q.format]
    stored = _signed_codes(q) + OFFSET[q.format]  # [N, K], unsigned field values
    fields = stored.unflatten(-1, (k // step, per_word, width))  # [N, S, V, W]
    words = torch.zeros((*fields.shape[:-2], width), dtype=torch.int32, device=stored.device)
    for i in range(per_word - 1):  # the low fields: their sum stays below 2^(32 - bits)
        words += fields[..., i, :] << (bits * i)
    # the top field carries the sign bit: add it as a signed multiple of 2^(32 - bits), which
    # is the two's-complement word without ever overflowing int32
    top = fields[..., per_word - 1, :]
    top = top - (top >= 1 << (bits - 1)).to(torch.int32) * (1 << bits)
    words += top * (1 << (bits * (per_word - 1)))
    codes = words.transpose(0, 1).contiguous()  # [S, N, W]
    if q.format == "int4":
        scales = q.scales.transpose(-2, -1).contiguous()  # [N, G] -> [G, N]
    else:
        scales = q.scales.contiguous()
    return PackedWeight(q.format, codes, scales, q.group_size, step, k)


def unpack(p: PackedWeight) -> QuantizedWeight:
    """The QuantizedWeight `p` was packed from (exactly)."""
    per_word = values_per_word(p.format)
    bits = BITS[p.format]
    words = p.codes.transpose(-3, -2).to(torch.int64) & 0xFFFFFFFF  # [..., N, S, W], unsigned
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    fields = (words.unsqueeze(-2) >> shifts[:, None]) & ((1 << bits) - 1)  # [..., N, S, V, W]
    signed = fields.flatten(-3) - OFFSET[p.format]  # [..., N, K]
    if p.format == "int4":
        nibbles = (signed + 8).to(torch.uint8)
        packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
        scales = p.scales.transpose(-2, -1).contiguous()
        return QuantizedWeight("int4", packed.contiguous(), scales, p.group_size, p.in_features)
    return QuantizedWeight("int8", signed.to(torch.int8), p.scales, p.group_size, p.in_features)
