"""The shapes of a grouped MoE GEMM launch, shared by the kernels and the launch configs.

    MoEGemmConfig          tile sizes of one launch (BLOCK_M/N/K, group, split-K, warps, stages)
    choose_config(...)     the heuristic, for devices without a tuned file (moe_configs.py)
    moe_align_block_size   sort the (token, expert) pairs by expert, pad each run to BLOCK_M

fused_moe.py (the float/QuantizedWeight kernels), packed_moe.py (the packed int8/int4 kernels)
and moe_configs.py (tuned configs as data) all build on this module and on nothing of each
other's that would loop back (fused_moe -> packed_moe -> moe_configs -> moe_tiles).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .quant import FMT_FLOAT
from .runtime import cdiv, sm_count


@dataclass(frozen=True)
class MoEGemmConfig:
    """Tile sizes of one grouped GEMM launch (see `choose_config`)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class AlignedRouting:
    """The (token, expert) pairs sorted by expert and padded per expert to block_m.

    sorted_ids: int32 [capacity]: row index into the flattened [M*k] pairs; padding holds M*k.
    expert_ids: int32 [capacity // block_m]: the expert of each block (blocks past the end: 0).
    num_padded: int32 [1]: used length of sorted_ids (a tensor, so nothing syncs to the host).
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    block_m: int


def moe_align_block_size(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> AlignedRouting:
    """Group the M*k routed pairs by expert, each expert's run padded to a multiple of block_m.

    Pure tensor ops without data-dependent shapes: the capacity is the worst case
    M*k + min(M*k, E) * (block_m - 1), so the same code runs inside a CUDA graph.
    """
    flat = topk_ids.flatten().to(torch.int64)  # [M*k]
    n_pairs = flat.numel()
    device = flat.device
    capacity = cdiv(n_pairs + min(n_pairs, n_experts) * (block_m - 1), block_m) * block_m
    counts = torch.zeros(n_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)  # pair indices grouped by expert
    expert_of = flat[order]
    first_of_expert = counts.cumsum(0) - counts  # index in `order` where each expert starts
    rank = torch.arange(n_pairs, device=device) - first_of_expert[expert_of]
    sorted_ids = torch.full((capacity,), n_pairs, dtype=torch.int32, device=device)
    sorted_ids[padded_start[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True)
    expert_ids = expert_ids.clamp_max(n_experts - 1).to(torch.int32)
    num_padded = padded_end[-1:].to(torch.int32)
    return AlignedRouting(sorted_ids, expert_ids, num_padded, block_m)


def choose_config(
    n_tokens: int, top_k: int, n_experts: int, n: int, k: int, fmt: int, device: torch.device
) -> MoEGemmConfig:
    """Tile heuristics for H100/H200 class GPUs (132 SMs, 50 MB L2), by rows per expert.

    Decode (a handful of rows per expert) is a weight-streaming GEMV: small BLOCK_M, long K
    blocks, deep pipelines, and split-K when the N tiles alone cannot fill the SMs. Prefill is
    compute bound: large square-ish tiles and GROUP_M swizzling so weight tiles stay in L2.
    int4 needs BLOCK_K to divide the quantization group (128).
    """
    rows_per_expert = n_tokens * top_k / max(1, min(n_experts, n_tokens * top_k))
    if rows_per_expert <= 16:
        config = MoEGemmConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    elif rows_per_expert <= 64:
        config = MoEGemmConfig(block_m=32, block_n=64, block_k=128, group_m=4, num_stages=4)
    elif rows_per_expert <= 256:
        config = MoEGemmConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4)
    else:
        config = MoEGemmConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8)
    if fmt == FMT_FLOAT and config.block_k > 64 and rows_per_expert > 16:
        config = replace(config, block_k=64)
    pairs = n_tokens * top_k
    blocks_m = cdiv(pairs + min(pairs, n_experts) * (config.block_m - 1), config.block_m)
    programs = blocks_m * cdiv(n, config.block_n)
    target = 2 * sm_count(device)
    if programs < target and rows_per_expert <= 16:
        k_blocks = cdiv(k, config.block_k)
        split_k = min(cdiv(target, programs), max(1, k_blocks // 8), 16)
        config = replace(config, split_k=max(1, split_k))
    return config
