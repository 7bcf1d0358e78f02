"""The storage layout of dense int8 / int4 weights that kernels/dense_quant.py reads.

- int8: codes int8 [N, K] (row n = output channel n, contiguous in K), scales fp16 [N].
- int4: codes uint8 [N, K // 2], N-major; within each quantization group of g inputs the
  byte j holds input j in its low nibble and input j + g/2 in its high nibble (+8 offset), so
  one load of a row's g/2 bytes unpacks with a mask and a shift into two contiguous halves of
  the group, each byte read once, and the activations are read as two contiguous runs.
  Scales fp16 [K // g, N]: the scales of one group for a block of rows are one contiguous run.
  (quant.py's layout interleaves even/odd inputs; reading it a K tile at a time loads each
  byte twice, which is what this layout removes.)

`repack_int4` makes it from quant.py's, `restore_int4` undoes it, `unpack_int4_repacked` reads
the codes back; all take leading dims ([E, N, K] stacks of experts alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .quant import FMT_INT4, FMT_INT8, QuantizedWeight, unpack_int4


def repack_int4(
    qweight: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.py's int4 ([..., N, K/2] even/odd nibbles, scales [..., N, G]) -> this module's
    ([..., N, K/2] half-split per group, scales [..., G, N]); see the module docstring."""
    codes = (unpack_int4(qweight) + 8).to(torch.uint8)  # [..., N, K] in [0, 15]
    in_features = codes.shape[-1]
    if group_size % 2 or in_features % group_size:
        raise ValueError(f"group size {group_size} must be even and divide {in_features}")
    groups = codes.unflatten(-1, (in_features // group_size, group_size))  # [..., N, G, g]
    half = group_size // 2
    packed = groups[..., :half] | (groups[..., half:] << 4)  # [..., N, G, g/2]
    return packed.flatten(-2).contiguous(), scales.transpose(-1, -2).contiguous()


def unpack_int4_repacked(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repacked uint8 [..., N, K/2] -> int8 codes in [-8, 7], [..., N, K]."""
    groups = codes.unflatten(-1, (codes.shape[-1] * 2 // group_size, group_size // 2))
    low = (groups & 0xF).to(torch.int8) - 8
    high = (groups >> 4).to(torch.int8) - 8
    return torch.cat((low, high), dim=-1).flatten(-2)  # [..., N, G, g] -> [..., N, K]


def restore_int4(
    codes: torch.Tensor, scales_t: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of repack_int4: back to quant.py's (qweight, scales)."""
    values = (unpack_int4_repacked(codes, group_size) + 8).to(torch.uint8)  # [..., N, K]
    packed = values[..., 0::2] | (values[..., 1::2] << 4)
    return packed.contiguous(), scales_t.transpose(-1, -2).contiguous()


@dataclass
class DenseQuantWeight:
    """A [N, K] weight in this module's layout (see the module docstring)."""

    format: Literal["int8", "int4"]
    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[-2])

    @property
    def code(self) -> int:
        return FMT_INT8 if self.format == "int8" else FMT_INT4

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight) -> DenseQuantWeight:
        if weight.format == "int8":
            codes, scales = weight.qweight.contiguous(), weight.scales.contiguous()
        else:
            codes, scales = repack_int4(weight.qweight, weight.scales, weight.group_size)
        return cls(weight.format, codes, scales, weight.group_size, weight.in_features)

    def to_quantized(self) -> QuantizedWeight:
        if self.format == "int8":
            return QuantizedWeight(
                "int8", self.codes, self.scales, self.group_size, self.in_features
            )
        qweight, scales = restore_int4(self.codes, self.scales, self.group_size)
        return QuantizedWeight("int4", qweight, scales, self.group_size, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.format == "int8":
            return (self.codes.float() * self.scales.float()[..., None]).to(dtype)
        values = unpack_int4_repacked(self.codes, self.group_size).float()  # [N, K]
        per_element = self.scales.float().transpose(-1, -2).repeat_interleave(self.group_size, -1)
        return (values * per_element).to(dtype)


def reference_linear(x: torch.Tensor, weight: DenseQuantWeight) -> torch.Tensor:
    """x [..., K] @ dequant(W)^T in fp32, in x's dtype: what dense_linear computes."""
    return (x.float() @ weight.dequantize(torch.float32).t()).to(x.dtype)
