"""The fused MoE kernel against the torch reference, and the reference against transformers.

Shapes: a single token, ragged counts that do not fill a block, several blocks per expert,
every token routed to the same two experts (the other six get no tokens), bf16 / int8 / int4
experts, fp32 and bf16 activations; on CPU through triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from local_backend.kernels import reference
from local_backend.kernels.fused_moe import (
    MoEGemmConfig,
    choose_config,
    fused_experts,
    fused_moe,
    moe_align_block_size,
)
from local_backend.kernels.packed import repack
from local_backend.kernels.quant import FMT_FLOAT, FMT_INT4, quantize
from local_backend.kernels.reference import ExpertWeight
from local_backend.model import MoE

from .helpers import BF16, FP32, assert_near, requires_triton, tiny_config

E, DIM, INTER, TOP_K = 8, 64, 128, 2


def make_experts(
    dtype: torch.dtype = torch.float32, fmt: str = "bf16"
) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
    w1 = torch.randn(E, INTER, DIM) * DIM**-0.5
    w3 = torch.randn(E, INTER, DIM) * DIM**-0.5
    w2 = torch.randn(E, DIM, INTER) * INTER**-0.5
    return quantize(w1.to(dtype), fmt), quantize(w3.to(dtype), fmt), quantize(w2.to(dtype), fmt)


def make_logits(n_tokens: int, routing: str) -> torch.Tensor:
    logits = torch.randn(n_tokens, E)
    if routing == "two_experts":  # every token picks experts 3 and 5; six experts get nothing
        logits[:, 3] += 20.0
        logits[:, 5] += 10.0
    return logits


# routing cases: one token; a ragged count; every token on experts 3 and 5 (6 experts get no
# tokens, and 20 rows per expert span two BLOCK_M = 16 blocks)
CASES = [(1, "random"), (6, "random"), (20, "two_experts")]
# (tokens, routing, format): every format at a single token, each shape with some format. The
# interpreter costs ~40 ms per program instance, so not the full product.
KERNEL_CASES = [
    (1, "random", "bf16"),
    (1, "random", "int8"),
    (1, "random", "int4"),
    (6, "random", "int8"),
    (20, "two_experts", "bf16"),
    (20, "two_experts", "int4"),
]


@requires_triton
@pytest.mark.parametrize(("n_tokens", "routing", "fmt"), KERNEL_CASES)
def test_fused_moe_matches_reference_fp32(n_tokens: int, routing: str, fmt: str) -> None:
    experts = make_experts(torch.float32, fmt)
    x = torch.randn(n_tokens, DIM)
    logits = make_logits(n_tokens, routing)
    expected = reference.moe(x, logits, TOP_K, *experts)
    assert_near(fused_moe(x, logits, TOP_K, *experts), expected, FP32)


@requires_triton
def test_fused_moe_every_token_on_one_expert() -> None:
    """top-1 routing with one expert taking all 20 tokens: two blocks, seven idle experts."""
    experts = make_experts(torch.float32, "int8")
    x = torch.randn(20, DIM)
    logits = make_logits(20, "two_experts")
    expected = reference.moe(x, logits, 1, *experts)
    assert_near(fused_moe(x, logits, 1, *experts), expected, FP32)


@requires_triton
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_fused_moe_bf16_activations(fmt: str) -> None:
    experts = make_experts(torch.bfloat16, fmt)
    x = torch.randn(6, DIM).bfloat16()
    logits = make_logits(6, "random")
    out = fused_moe(x, logits, TOP_K, *experts)
    assert out.dtype == torch.bfloat16
    assert_near(out, reference.moe(x, logits, TOP_K, *experts), BF16)


@requires_triton
@pytest.mark.parametrize(
    ("gate_up", "down", "fmt"),
    [
        # decode tiles, split-K on the down projection (4 x 32 of K = 128, atomic fp32
        # accumulation), int4 groups of 128 read in 32-wide K blocks
        (MoEGemmConfig(16, 64, 32), MoEGemmConfig(16, 64, 32, split_k=4), "int4"),
        # prefill tiles: BLOCK_M 32 with GROUP_M swizzling over several M blocks
        (MoEGemmConfig(32, 64, 32, group_m=4), MoEGemmConfig(32, 32, 64, group_m=2), "bf16"),
    ],
)
def test_explicit_tiles(gate_up: MoEGemmConfig, down: MoEGemmConfig, fmt: str) -> None:
    n_tokens = 12
    w1, w3, w2 = make_experts(torch.float32, fmt)
    x = torch.randn(n_tokens, DIM)
    weights, ids = reference.route(make_logits(n_tokens, "random"), TOP_K)
    out = fused_experts(x, weights, ids, w1, w3, w2, config=gate_up, down_config=down)
    assert_near(out, reference.moe_experts(x, weights, ids, w1, w3, w2), FP32)


@pytest.mark.parametrize(("n_tokens", "routing"), CASES)
@pytest.mark.parametrize("block_m", [4, 16])
def test_align_block_size(n_tokens: int, routing: str, block_m: int) -> None:
    _, ids = reference.route(make_logits(n_tokens, routing), TOP_K)
    aligned = moe_align_block_size(ids, E, block_m)
    pairs = n_tokens * TOP_K
    used = int(aligned.num_padded)
    sorted_ids = aligned.sorted_ids.long()
    assert used % block_m == 0
    assert (
        used
        <= sorted_ids.numel()
        == -(-(pairs + min(pairs, E) * (block_m - 1)) // block_m) * block_m
    )
    real = sorted_ids[:used][sorted_ids[:used] < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # every (token, expert) pair once
    assert bool((sorted_ids[used:] == pairs).all())  # the tail is padding
    flat = ids.flatten()
    for block in range(used // block_m):
        rows = sorted_ids[block * block_m : (block + 1) * block_m]
        rows = rows[rows < pairs]
        assert rows.numel() > 0  # no block is all padding
        assert bool((flat[rows] == aligned.expert_ids[block]).all())  # one expert per block
    counts = torch.bincount(flat, minlength=E)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())  # tight padding


def test_choose_config() -> None:
    cpu = torch.device("cpu")
    decode = choose_config(1, TOP_K, 8, 16384, 6144, FMT_FLOAT, cpu)
    prefill = choose_config(4096, TOP_K, 8, 16384, 6144, FMT_FLOAT, cpu)
    assert decode.block_m == 16 and prefill.block_m == 128
    for n_tokens in (1, 3, 64, 700, 4096):
        config = choose_config(n_tokens, TOP_K, 8, 6144, 16384, FMT_INT4, cpu)
        assert 128 % config.block_k == 0  # a K block never straddles two int4 groups
        assert config.split_k >= 1


def test_reference_matches_model_moe() -> None:
    """The reference is the model's MoE math (routing included)."""
    moe = MoE(tiny_config())
    x = torch.randn(2, 5, moe.w1.shape[-1])
    flat = x.reshape(10, -1)
    expected = reference.moe(flat, moe.gate(flat), moe.top_k, moe.w1, moe.w3, moe.w2)
    assert_near(moe(x).reshape(10, -1), expected, FP32)


def test_reference_matches_transformers_block() -> None:
    """...and transformers' MixtralSparseMoeBlock, an independent implementation."""
    pytest.importorskip("transformers")  # a dev dependency: `.[local]` alone has none
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_config = MixtralConfig(
        hidden_size=DIM, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=TOP_K
    )
    block = MixtralSparseMoeBlock(hf_config).eval()
    w1, w3, w2 = (torch.as_tensor(w) for w in make_experts())
    gate = torch.randn(E, DIM)
    with torch.no_grad():
        block.gate.weight.copy_(gate)
        block.experts.gate_up_proj.copy_(torch.cat((w1, w3), dim=1))  # [E, 2I, D]
        block.experts.down_proj.copy_(w2)
        x = torch.randn(1, 11, DIM)
        expected = block(x)[0]
    assert_near(reference.moe(x[0], x[0] @ gate.t(), TOP_K, w1, w3, w2), expected, FP32)


def torch_bf16_moe(
    x: torch.Tensor, logits: torch.Tensor, top_k: int, *experts: ExpertWeight
) -> torch.Tensor:
    """The torch backend's arithmetic: each hit expert as a bf16 matrix, bf16 matmuls (fp32
    accumulation inside cuBLAS), the intermediate rounded to bf16, as MoE.forward does."""
    weights, ids = reference.route(logits, top_k)
    w1, w3, w2 = experts
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(reference.n_stacked(w1)):
        tokens, slot = torch.where(ids == expert)
        if tokens.numel() == 0:
            continue
        xe = x[tokens]
        gate = xe @ reference.expert_matrix(w1, expert, x.dtype).t()
        up = xe @ reference.expert_matrix(w3, expert, x.dtype).t()
        down = (F.silu(gate) * up) @ reference.expert_matrix(w2, expert, x.dtype).t()
        out.index_add_(0, tokens, down.float() * weights[tokens, slot, None])
    return out.to(x.dtype)


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative Frobenius error ||actual - exact|| / ||exact||."""
    return float((actual.float() - exact).norm() / exact.norm())


@pytest.mark.gpu
@requires_triton
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("n_tokens", [1, 16, 64, 512, 4096])
def test_fused_moe_8x22b_shapes_gpu(fmt: str, n_tokens: int) -> None:
    """Real 8x22B expert shapes (hidden 6144, intermediate 16384, 8 experts) on CUDA, int8 /
    int4 experts in the packed layout the loader stores (every strategy: scan at 1 and 16
    tokens, aligned at 64 and 512, dequant at 4096, or what a tuned config picks).

    Why a norm-wise bound and not an elementwise one: each output is a sum over 16384 bf16
    products whose intermediate is rounded to bf16 (2^-8 relative), so an output that nearly
    cancels has an arbitrarily large relative error, and an elementwise atol at 1% of the RMS
    was exceeded by 3-5 of 3.1M elements at 512 tokens on an H200: a tail event of rounding,
    not a kernel bug. The judge is an fp32 reference (same quantized weights, same bf16 input,
    fp32 arithmetic throughout): the kernel's relative Frobenius error against it must be
    within 2x the error of the bf16 torch path (the arithmetic the model's own forward uses)
    against the same reference. Rounding noise of a correct kernel sits near 1x; a wrong
    index, scale, nibble or mask moves the error to O(1), hundreds of times the bound.
    """
    dim, inter = 6144, 16384
    device = torch.device("cuda")
    experts = []
    for shape in ((E, inter, dim), (E, inter, dim), (E, dim, inter)):
        weight = quantize(
            torch.randn(shape, device=device, dtype=torch.bfloat16) * shape[-1] ** -0.5, fmt
        )
        experts.append(weight if isinstance(weight, torch.Tensor) else repack(weight))
    x = torch.randn(n_tokens, dim, device=device, dtype=torch.bfloat16)
    logits = torch.randn(n_tokens, E, device=device)
    exact = reference.moe(x.float(), logits, TOP_K, *experts)  # fp32 in, fp32 math, fp32 out
    kernel_error = relative_error(fused_moe(x, logits, TOP_K, *experts), exact)
    torch_error = relative_error(torch_bf16_moe(x, logits, TOP_K, *experts), exact)
    assert 0 < torch_error < 2e-2  # the reference itself is sane: bf16 noise, ~0.3-1%
    assert kernel_error <= 2.0 * torch_error, (kernel_error, torch_error)
