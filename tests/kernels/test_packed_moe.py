"""The packed int8 / int4 MoE kernels (packed_moe.py) against the torch reference, every
strategy and both products (the dot-free GEMV below 16 rows, tl.dot from 16), on CPU through
triton's interpreter; and the heuristic's choice of strategy by M."""

from __future__ import annotations

import pytest
import torch

from local_backend.kernels import reference
from local_backend.kernels.fused_moe import MoEGemmConfig, fused_experts, fused_moe
from local_backend.kernels.moe_configs import MoELaunch, default_launch
from local_backend.kernels.packed import PackedWeight, repack
from local_backend.kernels.packed_moe import dequantize_expert, packed_experts
from local_backend.kernels.quant import QuantizedWeight, quantize

from .helpers import BF16, FP32, assert_near, requires_triton

# dim 128 and inter 256: int4 groups (= pack steps) of 128, 16-word fields, so tl.dot applies
E, DIM, INTER, TOP_K = 8, 128, 256, 2


def packed_experts_of(
    fmt: str, dtype: torch.dtype = torch.float32, inter: int = INTER
) -> list[PackedWeight]:
    shapes = ((E, inter, DIM), (E, inter, DIM), (E, DIM, inter))
    out = []
    for shape in shapes:
        q = quantize((torch.randn(shape) * shape[-1] ** -0.5).to(dtype), fmt)
        assert isinstance(q, QuantizedWeight)
        out.append(repack(q))
    return out


def scan(block_m: int, split: int = 1) -> MoELaunch:
    """A scan launch: gate/up in two N tiles, the down GEMM in four (times `split`)."""
    return MoELaunch(
        "scan", MoEGemmConfig(block_m, 128, 128), MoEGemmConfig(block_m, 32, 128, split_k=split)
    )


CASES = [
    # (format, tokens, every token on experts 3 and 5, launch):
    # GEMV at one row per expert with split-K on the down GEMM
    ("int4", 1, False, scan(1, split=2)),
    ("int8", 1, False, scan(1, split=2)),
    # two-row GEMV blocks, 5 rows on each of two experts: three passes per program
    ("int4", 5, True, scan(2)),
    # tl.dot at 16 rows, 20 rows on each of two experts (two passes; six experts idle)
    ("int8", 20, True, scan(16, split=2)),
    # aligned blocks (prefill form) and the dequantize-then-matmul strategy
    (
        "int4",
        20,
        True,
        MoELaunch("aligned", MoEGemmConfig(16, 64, 128), MoEGemmConfig(16, 64, 128)),
    ),
    (
        "int8",
        6,
        False,
        MoELaunch("aligned", MoEGemmConfig(16, 32, 128), MoEGemmConfig(16, 64, 128)),
    ),
    ("int4", 6, False, MoELaunch("dequant")),
]


@requires_triton
@pytest.mark.parametrize(("fmt", "n_tokens", "skewed", "launch"), CASES)
def test_packed_experts_match_reference(
    fmt: str, n_tokens: int, skewed: bool, launch: MoELaunch
) -> None:
    w1, w3, w2 = packed_experts_of(fmt)
    x = torch.randn(n_tokens, DIM)
    logits = torch.randn(n_tokens, E)
    if skewed:
        logits[:, 3] += 20.0
        logits[:, 5] += 10.0
    weights, ids = reference.route(logits, TOP_K)
    expected = reference.moe_experts(x, weights, ids, w1, w3, w2)
    assert_near(packed_experts(x, weights, ids, w1, w3, w2, launch), expected, FP32)


@requires_triton
def test_fused_moe_dispatches_packed_weights_bf16() -> None:
    """fused_moe on packed experts (heuristic launch), bf16 activations and weights."""
    w1, w3, w2 = packed_experts_of("int4", torch.bfloat16)
    x = torch.randn(3, DIM).bfloat16()
    logits = torch.randn(3, E)
    out = fused_moe(x, logits, TOP_K, w1, w3, w2)
    assert out.dtype == torch.bfloat16
    assert_near(out, reference.moe(x, logits, TOP_K, w1, w3, w2), BF16)
    weights, ids = reference.route(logits, TOP_K)
    explicit = fused_experts(x, weights, ids, w1, w3, w2, launch=scan(4))
    assert_near(explicit, out, BF16)


@requires_triton
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_dequantize_kernel_is_exact(fmt: str) -> None:
    w = packed_experts_of(fmt)[2]  # [E, DIM, INTER]: two pack steps per row
    for expert in (0, 7):
        dense = dequantize_expert(w, expert, torch.float32, kernel=True)
        assert torch.equal(dense, w.expert(expert).dequantize(torch.float32))


def test_heuristic_strategy_by_tokens() -> None:
    """The GPU heuristic (no CUDA call needed: the device is only named) and the interpreter's."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def pick(device: torch.device, fmt: str, m: int) -> MoELaunch:
        return default_launch(device, fmt, 8, 2, 6144, 16384, m, sms=132)  # an H100's SMs

    one = pick(cuda, "int4", 1)
    assert one.strategy == "scan" and one.gate_up.block_m == 1  # the GEMV form at M = 1
    assert one.down.split_k > 1  # N = 6144 alone leaves SMs idle at M = 1
    assert pick(cuda, "int4", 4).gate_up.block_m == 4  # at most 4 rows per expert: one pass
    assert pick(cuda, "int8", 16).gate_up.block_m == 16  # tl.dot from 8 tokens
    assert pick(cuda, "int8", 32).strategy == "scan"
    assert pick(cuda, "int8", 64).strategy == "aligned"
    assert pick(cuda, "int4", 4096).strategy == "dequant"
    assert pick(cpu, "int4", 4096).strategy == "aligned"  # dequant syncs; CUDA only
    assert pick(cpu, "int4", 1).gate_up.block_m == 16  # the interpreter: fewest programs
    assert pick(cpu, "bf16", 1).strategy == "aligned"  # fused_moe's kernel and tiles


@requires_triton
def test_bf16_experts_dense_strategy() -> None:
    """bf16 experts under a `dequant` launch (tuned for large M): per-expert dense matmuls."""
    shapes = ((E, INTER, DIM), (E, INTER, DIM), (E, DIM, INTER))
    w1, w3, w2 = (torch.randn(shape) * shape[-1] ** -0.5 for shape in shapes)
    x = torch.randn(7, DIM)
    weights, ids = reference.route(torch.randn(7, E), TOP_K)
    out = fused_experts(x, weights, ids, w1, w3, w2, launch=MoELaunch("dequant"))
    assert_near(out, reference.moe_experts(x, weights, ids, w1, w3, w2), FP32)
