"""Fused sparse-MoE forward in Triton (the grouped-GEMM pattern of vLLM's fused_moe).

    route (fp32 softmax, top-2, renormalise)             torch, [M, E] -> [M, k]
    align: sort the M*k (token, expert) pairs by expert,  torch, no host sync (graph-safe)
           pad each expert's run to BLOCK_M
    GEMM 1: per BLOCK_M rows of one expert,               Triton, [M*k, I] = silu(x W1^T) * x W3^T
            W1 and W3 tiles read in the same K loop
    GEMM 2: same blocks, times the routing weight,        Triton, [M*k, K] (split-K for small M)
    sum over the k experts of each token                  torch, [M, k, K] -> [M, K]

A block of BLOCK_M sorted rows belongs to a single expert, so each weight tile is read once per
block: at decode (M = 1) that is exactly the two routed experts' weights, the bandwidth floor.
Weights may be float ([E, N, K] tensors) or QuantizedWeight (int8 / int4, dequantized in the
K loop by the helpers in quant.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import moe_configs, packed_moe
from .moe_configs import MoELaunch
from .moe_tiles import AlignedRouting, MoEGemmConfig, choose_config, moe_align_block_size
from .packed import PackedWeight
from .quant import FMT_FLOAT, FMT_INT4, QuantizedWeight
from .reference import ExpertWeight, route
from .runtime import HAS_TRITON, cdiv, check_device, interpreting, launch_options, tl
from .runtime import triton as _triton

if HAS_TRITON:  # the tile helpers exist only where triton does
    from .quant import accumulate_weight_tile, finish_channel_scale, weight_tile_ptrs


def _weight_parts(weight: ExpertWeight) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(codes or weights, scales, format code, group size, N) of a stacked [E, N, K] weight."""
    if isinstance(weight, QuantizedWeight):
        return weight.qweight, weight.scales, weight.code, weight.group_size, weight.out_features
    if not isinstance(weight, torch.Tensor):
        raise TypeError("packed weights run in packed_moe (fused_experts dispatches them)")
    return weight, weight, FMT_FLOAT, 1, int(weight.shape[1])


if HAS_TRITON:

    @_triton.jit
    def _moe_gemm_kernel(
        a_ptr, w_ptr, w3_ptr, s_ptr, s3_ptr, c_ptr, topk_weights_ptr,
        sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
        N, K, num_pairs, capacity, k_per_split,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk,
        stride_se, stride_sn, stride_sg, stride_cm, stride_cn,
        A_ROWS_PER_TOKEN: tl.constexpr, FUSE_GATE_UP: tl.constexpr,
        MUL_ROUTED_WEIGHT: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, GROUP_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """One [BLOCK_M, BLOCK_N] tile of C for one expert's block of sorted rows.

        Row r of C is pair r (token r // k, its j-th expert); A's row for it is
        r // A_ROWS_PER_TOKEN (tokens for GEMM 1, pairs for GEMM 2). FUSE_GATE_UP: C =
        silu(A W1^T) * (A W3^T). SPLIT_K > 1: grid axis 1 splits K, partials atomically added
        into an fp32 C that starts at zero. Grid: (blocks_m * blocks_n, SPLIT_K).
        """
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        blocks_m = tl.cdiv(capacity, BLOCK_M)
        blocks_n = tl.cdiv(N, BLOCK_N)
        # GROUP_M swizzle: neighbouring programs share weight tiles while they are in L2
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = min(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return

        offs_sorted = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair_rows = tl.load(sorted_ids_ptr + offs_sorted)
        row_mask = pair_rows < num_pairs
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(K, k_begin + k_per_split)
        offs_k = k_begin + tl.arange(0, BLOCK_K)

        a_rows = (pair_rows // A_ROWS_PER_TOKEN).to(tl.int64)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_base = w_ptr + expert * stride_we
        w_ptrs = weight_tile_ptrs(w_base, offs_k, offs_n, stride_wn, stride_wk, WEIGHT_FORMAT)
        w3_ptrs = weight_tile_ptrs(
            w3_ptr + expert * stride_we, offs_k, offs_n, stride_wn, stride_wk, WEIGHT_FORMAT
        )
        s_ptrs = s_ptr + expert * stride_se + offs_n * stride_sn
        s3_ptrs = s3_ptr + expert * stride_se + offs_n * stride_sn
        w_step = BLOCK_K // 2 if WEIGHT_FORMAT == 2 else BLOCK_K

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(k_begin, k_end, BLOCK_K):
            k_mask = offs_k < k_end
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
            acc = accumulate_weight_tile(
                acc, a, w, offs_k, k_start, s_ptrs, stride_sg, n_mask,
                WEIGHT_FORMAT, GROUP_K, DOT_FP32,
            )  # fmt: skip
            if FUSE_GATE_UP:
                w3 = tl.load(w3_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
                acc3 = accumulate_weight_tile(
                    acc3, a, w3, offs_k, k_start, s3_ptrs, stride_sg, n_mask,
                    WEIGHT_FORMAT, GROUP_K, DOT_FP32,
                )  # fmt: skip
                w3_ptrs += w_step * stride_wk
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += w_step * stride_wk
            offs_k += BLOCK_K

        acc = finish_channel_scale(acc, s_ptrs, n_mask, WEIGHT_FORMAT)
        if FUSE_GATE_UP:
            acc3 = finish_channel_scale(acc3, s3_ptrs, n_mask, WEIGHT_FORMAT)
            acc = acc * tl.sigmoid(acc) * acc3  # silu(gate) * up, in fp32
        if MUL_ROUTED_WEIGHT:
            routed = tl.load(topk_weights_ptr + pair_rows, mask=row_mask, other=0.0)
            acc = acc * routed.to(tl.float32)[:, None]
        c_ptrs = c_ptr + pair_rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
        c_mask = row_mask[:, None] & n_mask[None, :]
        if SPLIT_K > 1:
            tl.atomic_add(c_ptrs, acc, mask=c_mask)
        else:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _launch_gemm(
    a: torch.Tensor,
    weight: ExpertWeight,
    weight3: ExpertWeight | None,
    out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    routing: AlignedRouting,
    rows_per_token: int,
    config: MoEGemmConfig,
) -> None:
    w, scales, fmt, group, n = _weight_parts(weight)
    w3, scales3 = (w, scales) if weight3 is None else _weight_parts(weight3)[:2]
    k = a.shape[1]
    if fmt == FMT_INT4 and group % config.block_k:
        config = replace(config, block_k=group)
    k_per_split = cdiv(cdiv(k, config.split_k), config.block_k) * config.block_k
    split_k = cdiv(k, k_per_split)
    if split_k > 1 and out.dtype != torch.float32:
        raise ValueError("split-K accumulates atomically and needs an fp32 output")
    capacity = routing.sorted_ids.numel()
    scale_strides = (0, 0, 0)
    if fmt != FMT_FLOAT:
        scale_strides = (scales.stride(0), scales.stride(1), scales.stride(2) if fmt == 2 else 0)
    grid = (cdiv(capacity, config.block_m) * cdiv(n, config.block_n), split_k)
    _moe_gemm_kernel[grid](
        a, w, w3, scales, scales3, out,
        topk_weights if topk_weights is not None else out,
        routing.sorted_ids, routing.expert_ids, routing.num_padded,
        n, k, out.shape[0], capacity, k_per_split,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        *scale_strides, out.stride(0), out.stride(1),
        A_ROWS_PER_TOKEN=rows_per_token, FUSE_GATE_UP=weight3 is not None,
        MUL_ROUTED_WEIGHT=topk_weights is not None, WEIGHT_FORMAT=fmt, GROUP_K=max(1, group),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, SPLIT_K=split_k,
        DOT_FP32=interpreting() or a.dtype == torch.float32,
        **launch_options(config.num_warps, config.num_stages),
    )  # fmt: skip


def fused_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: ExpertWeight,
    w3: ExpertWeight,
    w2: ExpertWeight,
    config: MoEGemmConfig | None = None,
    down_config: MoEGemmConfig | None = None,
    launch: MoELaunch | None = None,
) -> torch.Tensor:
    """Triton experts for already-routed tokens: x [M, K], topk_* [M, k] -> [M, K] (x's dtype).

    `config` / `down_config` override the heuristic tiles (benchmarks and tests); the routing
    is aligned once, to the first GEMM's BLOCK_M, which both GEMMs share. Packed experts (the
    layout quantize-at-load stores) run packed_moe's kernels, with moe_configs' launch (tuned
    per device and M bucket, `launch` overrides it); bf16 experts read a tuned file as well.
    """
    if isinstance(w1, PackedWeight):
        assert isinstance(w3, PackedWeight) and isinstance(w2, PackedWeight)
        return packed_moe.packed_experts(x, topk_weights, topk_ids, w1, w3, w2, launch)
    check_device(x)
    if config is None and launch is None and isinstance(w1, torch.Tensor):
        launch = moe_configs.tuned_launch(x.device, "bf16", int(w1.shape[0]), topk_ids.shape[1],
                                          x.shape[1], int(w1.shape[1]), x.shape[0])  # fmt: skip
    if launch is not None:
        if launch.strategy == "dequant" and isinstance(w1, torch.Tensor):
            if not packed_moe.capturing(x):  # bf16 "dequant": per-expert cuBLAS, as stored
                assert isinstance(w3, torch.Tensor) and isinstance(w2, torch.Tensor)
                return packed_moe.dense_experts(x, topk_weights, topk_ids, w1, w3, w2)
        else:
            config, down_config = config or launch.gate_up, down_config or launch.down
    n_tokens, dim = x.shape
    top_k = topk_ids.shape[1]
    w1_codes, _, fmt, _, inter = _weight_parts(w1)
    n_experts = int(w1_codes.shape[0])
    x = x.contiguous()
    if config is None:
        config = choose_config(n_tokens, top_k, n_experts, inter, dim, fmt, x.device)
    if down_config is None:
        down_config = choose_config(n_tokens, top_k, n_experts, dim, inter, fmt, x.device)
    down_config = replace(down_config, block_m=config.block_m)
    routing = moe_align_block_size(topk_ids, n_experts, config.block_m)
    pairs = n_tokens * top_k
    # GEMM 1 never splits K: silu(gate) * up needs the whole dot product
    gate_up_config = replace(config, split_k=1)
    hidden = torch.empty(pairs, inter, device=x.device, dtype=x.dtype)  # [M*k, I]
    _launch_gemm(x, w1, w3, hidden, None, routing, top_k, gate_up_config)
    split = down_config.split_k > 1
    down = (torch.zeros if split else torch.empty)(
        pairs, dim, device=x.device, dtype=torch.float32 if split else x.dtype
    )  # [M*k, K]
    weights = topk_weights.to(torch.float32).contiguous().flatten()  # [M*k]
    _launch_gemm(hidden, w2, None, down, weights, routing, 1, down_config)
    summed = down.view(n_tokens, top_k, dim).sum(dim=1, dtype=torch.float32)  # [M, K]
    return summed.to(x.dtype)


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    w1: ExpertWeight,
    w3: ExpertWeight,
    w2: ExpertWeight,
) -> torch.Tensor:
    """The sparse MoE block: x [M, K] and router logits [M, E] -> [M, K]."""
    topk_weights, topk_ids = route(router_logits, top_k)
    return fused_experts(x, topk_weights, topk_ids, w1, w3, w2)
