"""Shared pieces of the kernel tests: the triton skip, tolerances, tiny models."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from local_backend.config import ModelConfig
from local_backend.kernels.runtime import HAS_TRITON, interpreting
from local_backend.model import Transformer


def _triton_unusable() -> str:
    if not HAS_TRITON:
        return "triton is not installed"
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA, and triton was imported before its interpreter could be chosen"
    return ""


class Tolerance(NamedTuple):
    atol: float
    rtol: float


requires_triton = pytest.mark.skipif(bool(_triton_unusable()), reason=_triton_unusable())

# Tolerances of kernel vs reference (torch.testing.assert_close: |a - b| <= atol + rtol |b|).
# fp32: both sides accumulate in fp32 and differ only in summation order (observed <= 1e-6 on
# O(1) values), so 1e-5 catches any real indexing or masking bug, which moves values by O(1).
FP32 = Tolerance(atol=1e-5, rtol=1e-5)
# bf16: one rounding of the output is 2^-8 relative; the interpreter truncates fp32 -> bf16
# instead of rounding (one more ulp), and kernels that store a bf16 intermediate (the MoE's
# silu(gate) * up) add a rounding the fp32 reference does not have. 2 ulps = 1.6e-2 relative
# is torch's own default for bf16; atol covers values near zero at the outputs' O(1) scale.
BF16 = Tolerance(atol=2e-2, rtol=1.6e-2)


def tol(dtype: torch.dtype) -> Tolerance:
    return FP32 if dtype == torch.float32 else BF16


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance) -> None:
    torch.testing.assert_close(actual, expected, atol=tolerance.atol, rtol=tolerance.rtol)


def tiny_config(**overrides: object) -> ModelConfig:
    """The "tiny" preset (8x22B architecture at dim 64) with a small vocabulary."""
    config = ModelConfig.from_name("tiny")
    config.vocab_size = 256
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(
    seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object
) -> Transformer:
    torch.manual_seed(seed)
    return Transformer.from_config(tiny_config(**overrides), dtype=dtype)
