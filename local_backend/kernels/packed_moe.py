"""The MoE experts on packed int8 / int4 weights (layout: packed.py), three strategies
(moe_configs.py says which runs at which M):

    scan     GEMM 1 grid (N tiles, E): each program scans the M*k routed pairs for its expert
             (a cumsum and a one-hot compaction in registers, no torch alignment pass), returns at
             once when its expert got no token, and streams its [BLOCK_N, K] slice of W1 and W3
             once for up to BLOCK_M rows (more rows: another pass). GEMM 2 grid (N tiles x
             split-K, E): the same over its K slice of W2, routing weight applied, atomically
             added into the fp32 [M, K] output at the token's row (no [M*k, K] buffer, no sum).
             Below 16 rows per expert the product is a dot-free GEMV (x slice times the unpacked
             field, summed in fp32 on CUDA cores): no tensor-core padding of 1 row to 16.
    aligned  the same tile loop over moe_align_block_size's sorted blocks, tl.dot (prefill)
    dequant  per hit expert: dequantize to x's dtype (a streaming Triton kernel), dense matmuls

Unpacking a field is a mask, an OR into the exponent of 2^23 and one subtraction: the fp32 bit
pattern 0x4B000000 | (v << s) is exactly 2^23 + v * 2^s while the field fits the mantissa, so
(that - 2^23 - offset * 2^s) is the signed code times 2^s, with the 2^-s folded into x (exact):
no per-field shift, no int-to-float conversion (which runs at a fraction of the FMA rate). At
M = 1 these integer ops, not the bytes, are what could bound int4 on the ALUs: 2 integer + 2
float ops per weight (the FMA included) is ~4 x 9.6e12 weights/s at an H200's 4.8 TB/s, about
the 33e12 lane-ops/s of its 132 SMs; the GPU run says how close it gets.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from . import packed_kernels  # its kernels exist only where triton does
from .moe_configs import MoELaunch, select_launch
from .moe_tiles import MoEGemmConfig, moe_align_block_size
from .packed import BITS, OFFSET, PackedWeight, values_per_word
from .runtime import cdiv, check_device, interpreting, launch_options
from .runtime import next_power_of_2 as _pow2

ROUTE_SCAN, ROUTE_ALIGNED = 0, 1
IN_PLACE = {"int4": 5, "int8": 2}  # fields decodable in place: BITS * (j + 1) <= 23


def dequantize_expert(
    weight: PackedWeight, expert: int, dtype: torch.dtype, kernel: bool | None = None
) -> torch.Tensor:
    """Expert `expert` of a packed [E, ...] weight as a dense [N, K] matrix in `dtype`: the
    Triton kernel (streaming, each byte once) on CUDA or where `kernel` asks for it, else the
    torch unpack."""
    one = weight.expert(expert)
    if not (kernel if kernel is not None else weight.codes.device.type == "cuda"):
        return one.dequantize(dtype)
    check_device(one.codes)
    n = one.out_features
    out = torch.empty(n, one.in_features, device=one.codes.device, dtype=dtype)
    block_n = 64
    packed_kernels.dequant_packed_kernel[(cdiv(n, block_n), one.n_steps)](
        one.codes, one.scales, out, n, one.codes.stride(0), one.codes.stride(1),
        one.scales.stride(0) if one.format == "int4" else 0, out.stride(0),
        BITS=BITS[one.format], OFFSET=OFFSET[one.format], PK=one.pack_k,
        WIDTH=one.pack_k // values_per_word(one.format), BLOCK_N=block_n,
        **launch_options(4, 2),
    )  # fmt: skip
    return out


def _launch_packed(
    a: torch.Tensor,
    weight: PackedWeight,
    weight3: PackedWeight | None,
    out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    topk_ids: torch.Tensor,
    routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    a_rows_div: int,
    c_rows_div: int,
    config: MoEGemmConfig,
) -> None:
    """One packed GEMM; `routing` None = scan (grid axis 1 over experts), else aligned blocks
    (sorted_ids, expert_ids, num_padded). out is written at row pair // c_rows_div, atomically
    (fp32 out) where c_rows_div > 1 or K is split."""
    n_experts = int(weight.codes.shape[0])
    n, n_steps = weight.out_features, weight.n_steps
    width = weight.pack_k // values_per_word(weight.format)
    split = max(1, min(config.split_k, n_steps))
    steps_per_split = cdiv(n_steps, split)
    split = cdiv(n_steps, steps_per_split)
    atomic = split > 1 or c_rows_div > 1
    if atomic and out.dtype != torch.float32:
        raise ValueError("split-K and per-token accumulation add atomically into an fp32 output")
    if weight3 is not None and split > 1:
        raise ValueError("the fused gate/up GEMM needs whole dot products (split_k = 1)")
    num_pairs = topk_ids.numel()
    ids = topk_ids.reshape(-1)
    if routing is None:
        if num_pairs > 1024:
            raise ValueError(f"the scan strategy scans all pairs per program ({num_pairs})")
        sorted_ids = expert_ids = num_padded = ids
        blocks = n_experts
    else:
        sorted_ids, expert_ids, num_padded = routing
        blocks = cdiv(sorted_ids.numel(), config.block_m)
    use_dot = config.block_m >= 16 and width >= 16 and config.block_n >= 16
    w3 = weight3 if weight3 is not None else weight
    # one compile serves every M <= 32 (top-2); the aligned route never reads BLOCK_P, so a
    # fixed value there keeps prefill from compiling the kernel again per power of two of M
    block_p = max(64, _pow2(num_pairs)) if routing is None else 64
    grid = (cdiv(n, config.block_n) * split, blocks)
    packed_kernels.packed_moe_kernel[grid](
        a, weight.codes, w3.codes, weight.scales, w3.scales, out,
        topk_weights if topk_weights is not None else out,
        ids, sorted_ids, expert_ids, num_padded,
        n, num_pairs, n_steps, steps_per_split, split,
        a.stride(0), weight.codes.stride(0), weight.codes.stride(1), weight.codes.stride(2),
        weight.scales.stride(0), weight.scales.stride(1) if weight.format == "int4" else 0,
        out.stride(0),
        ROUTE=ROUTE_SCAN if routing is None else ROUTE_ALIGNED, BLOCK_P=block_p,
        A_ROWS_DIV=a_rows_div, C_ROWS_DIV=c_rows_div, FUSE_GATE_UP=weight3 is not None,
        MUL_ROUTED_WEIGHT=topk_weights is not None, ATOMIC=atomic,
        BITS=BITS[weight.format], OFFSET=OFFSET[weight.format], PK=weight.pack_k, WIDTH=width,
        IN_PLACE=IN_PLACE[weight.format], BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        USE_DOT=use_dot,
        DOT_FP32=interpreting() or a.dtype == torch.float32,
        **launch_options(config.num_warps, config.num_stages),
    )  # fmt: skip


def _grouped(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: PackedWeight,
    w3: PackedWeight,
    w2: PackedWeight,
    launch: MoELaunch,
) -> torch.Tensor:
    """The scan / aligned strategies: two packed GEMMs, the second accumulating per token."""
    n_tokens, dim = x.shape
    top_k = topk_ids.shape[1]
    pairs = n_tokens * top_k
    routing = None
    gate_up, down = launch.gate_up, replace(launch.down, block_m=launch.gate_up.block_m)
    if launch.strategy == "aligned":
        aligned = moe_align_block_size(topk_ids, int(w1.codes.shape[0]), gate_up.block_m)
        routing = (aligned.sorted_ids, aligned.expert_ids, aligned.num_padded)
    hidden = torch.empty(pairs, w1.out_features, device=x.device, dtype=x.dtype)  # [M*k, I]
    _launch_packed(x, w1, w3, hidden, None, topk_ids, routing, top_k, 1,
                   replace(gate_up, split_k=1))  # fmt: skip
    out = torch.zeros(n_tokens, dim, device=x.device, dtype=torch.float32)  # [M, K]
    weights = topk_weights.to(torch.float32).contiguous().reshape(-1)  # [M*k]
    _launch_packed(hidden, w2, None, out, weights, topk_ids, routing, 1, top_k, down)
    return out.to(x.dtype)


def dense_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: PackedWeight | torch.Tensor,
    w3: PackedWeight | torch.Tensor,
    w2: PackedWeight | torch.Tensor,
) -> torch.Tensor:
    """The dequant strategy: per hit expert, its dense weights in x's dtype (packed: dequantized
    once, by the streaming kernel; bf16: as stored), then plain matmuls (cuBLAS). One host sync
    for the per-expert counts: prefill only, never inside a CUDA graph."""

    def dense(weight: PackedWeight | torch.Tensor, expert: int) -> torch.Tensor:
        if isinstance(weight, PackedWeight):
            return dequantize_expert(weight, expert, x.dtype)
        return weight[expert].to(x.dtype)

    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    n_experts = int(w1.codes.shape[0] if isinstance(w1, PackedWeight) else w1.shape[0])
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    weights = topk_weights.to(torch.float32).reshape(-1)
    out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pair_rows = order[start : start + count]
        start += count
        tokens = pair_rows // top_k
        xe = x[tokens]  # [m_e, K]
        gate = F.linear(xe, dense(w1, expert))
        up = F.linear(xe, dense(w3, expert))
        down = F.linear(F.silu(gate) * up, dense(w2, expert))
        out.index_add_(0, tokens, down.float() * weights[pair_rows, None])
    return out.to(x.dtype)


def capturing(x: torch.Tensor) -> bool:
    """Inside a CUDA graph capture (where the dequant strategy's host sync is not allowed)."""
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def packed_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: PackedWeight,
    w3: PackedWeight,
    w2: PackedWeight,
    launch: MoELaunch | None = None,
) -> torch.Tensor:
    """Experts on packed weights for routed tokens: x [M, K], topk_* [M, k] -> [M, K].

    `launch` overrides the configured one (moe_configs.select_launch: tuned file or heuristic).
    Inside a CUDA graph capture the dequant strategy (which syncs) is replaced by aligned.
    """
    check_device(x)
    x = x.contiguous()
    n_tokens, dim = x.shape
    if launch is None:
        launch = select_launch(x.device, w1.format, int(w1.codes.shape[0]), topk_ids.shape[1],
                               dim, w1.out_features, n_tokens)  # fmt: skip
    if launch.strategy == "scan" and topk_ids.numel() > 1024:
        launch = replace(launch, strategy="aligned")
    if launch.strategy == "dequant" and not capturing(x):
        return dense_experts(x, topk_weights, topk_ids, w1, w3, w2)
    if launch.strategy == "dequant":
        launch = replace(launch, strategy="aligned")
    return _grouped(x, topk_weights, topk_ids, w1, w3, w2, launch)
