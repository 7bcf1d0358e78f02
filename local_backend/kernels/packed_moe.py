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

Unpacking a field is shift, mask, OR into the exponent of 2^23 and one subtraction: the fp32
bit pattern 0x4B000000 | v is exactly 2^23 + v, so (that - 2^23 - offset) is the signed code
without an int-to-float conversion (which runs at a fraction of the FMA rate).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .fused_moe import MoEGemmConfig, moe_align_block_size
from .moe_configs import MoELaunch, select_launch
from .packed import BITS, OFFSET, PackedWeight, values_per_word
from .runtime import HAS_TRITON, cdiv, check_device, interpreting, launch_options, tl
from .runtime import next_power_of_2 as _pow2
from .runtime import triton as _triton

ROUTE_SCAN, ROUTE_ALIGNED = 0, 1
_MAGIC = 0x4B000000  # fp32 bits of 2^23
_TWO_23 = 8388608.0

if HAS_TRITON:

    @_triton.jit
    def _packed_tile(
        a_ptr, w_ptr, w3_ptr, s_ptr, s3_ptr, c_ptr, topk_w_ptr,
        pair_rows, row_mask, expert, pid_n, pid_k,
        N, n_steps, steps_per_split,
        stride_am, stride_we, stride_ws, stride_wn, stride_se, stride_ss, stride_cm,
        A_ROWS_DIV: tl.constexpr, C_ROWS_DIV: tl.constexpr, FUSE_GATE_UP: tl.constexpr,
        MUL_ROUTED_WEIGHT: tl.constexpr, ATOMIC: tl.constexpr,
        BITS: tl.constexpr, OFFSET: tl.constexpr, PK: tl.constexpr, WIDTH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """C[rows, n tile] (+)= epilogue(A[rows] @ dequant(W_e[n tile, K slice])^T)."""
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_w = tl.arange(0, WIDTH)
        s_begin = pid_k * steps_per_split
        s_end = tl.minimum(n_steps, s_begin + steps_per_split)
        a_rows = (pair_rows // A_ROWS_DIV).to(tl.int64)
        a_base = a_ptr + a_rows[:, None] * stride_am + offs_w[None, :]  # [BLOCK_M, WIDTH]
        w_off = expert * stride_we + offs_n[:, None] * stride_wn + offs_w[None, :]  # [BN, W]
        s_off = expert * stride_se + offs_n
        # GEMV form: the products stay [BLOCK_M, BLOCK_N, WIDTH] and are reduced over WIDTH
        # once, after the K loop (no cross-lane reduction per field; one per program)
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N, WIDTH), dtype=tl.float32)
        acc3 = acc
        for step in range(s_begin, s_end):
            words = tl.load(w_ptr + w_off + step * stride_ws, mask=n_mask[:, None], other=0)
            if FUSE_GATE_UP:
                words3 = tl.load(w3_ptr + w_off + step * stride_ws, mask=n_mask[:, None], other=0)
            if USE_DOT:  # (not tl.zeros_like: a nested jit call, dear in the interpreter)
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            else:
                part = tl.zeros((BLOCK_M, BLOCK_N, WIDTH), dtype=tl.float32)
            part3 = part
            for i in tl.static_range(32 // BITS):
                # field i of every word: inputs step*PK + i*WIDTH + [0, WIDTH)
                x = tl.load(a_base + (step * PK + i * WIDTH), mask=row_mask[:, None], other=0.0)
                bits = ((words >> (BITS * i)) & ((1 << BITS) - 1)) | 0x4B000000
                w = bits.to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)  # [BN, W] codes
                if FUSE_GATE_UP:
                    bits3 = ((words3 >> (BITS * i)) & ((1 << BITS) - 1)) | 0x4B000000
                    w3 = bits3.to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)
                if USE_DOT:
                    if DOT_FP32:  # the interpreter's bf16 dot is wrong; fp32 activations exact
                        x32 = x.to(tl.float32)
                        part += tl.dot(x32, tl.trans(w), input_precision="ieee")
                        if FUSE_GATE_UP:
                            part3 += tl.dot(x32, tl.trans(w3), input_precision="ieee")
                    else:
                        part += tl.dot(x, tl.trans(w.to(x.dtype)))
                        if FUSE_GATE_UP:
                            part3 += tl.dot(x, tl.trans(w3.to(x.dtype)))
                else:
                    x3 = x.to(tl.float32)[:, None, :]
                    part += x3 * w[None, :, :]
                    if FUSE_GATE_UP:
                        part3 += x3 * w3[None, :, :]
            if BITS == 4:  # one group per step: scale the step's partial sums
                scale = tl.load(s_ptr + s_off + step * stride_ss, mask=n_mask, other=0.0)
                if USE_DOT:
                    acc += part * scale.to(tl.float32)[None, :]
                else:
                    acc += part * scale.to(tl.float32)[None, :, None]
                if FUSE_GATE_UP:
                    scale3 = tl.load(s3_ptr + s_off + step * stride_ss, mask=n_mask, other=0.0)
                    if USE_DOT:
                        acc3 += part3 * scale3.to(tl.float32)[None, :]
                    else:
                        acc3 += part3 * scale3.to(tl.float32)[None, :, None]
            else:  # int8: per-channel scale, once at the end
                acc += part
                if FUSE_GATE_UP:
                    acc3 += part3
        if USE_DOT:
            out = acc
            out3 = acc3
        else:
            out = tl.sum(acc, axis=2)
            out3 = out
            if FUSE_GATE_UP:
                out3 = tl.sum(acc3, axis=2)
        if BITS == 8:
            out = out * tl.load(s_ptr + s_off, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if FUSE_GATE_UP:
                scale3 = tl.load(s3_ptr + s_off, mask=n_mask, other=0.0).to(tl.float32)
                out3 = out3 * scale3[None, :]
        if FUSE_GATE_UP:
            out = out * tl.sigmoid(out) * out3  # silu(gate) * up, in fp32
        if MUL_ROUTED_WEIGHT:
            routed = tl.load(topk_w_ptr + pair_rows, mask=row_mask, other=0.0)
            out = out * routed.to(tl.float32)[:, None]
        c_rows = (pair_rows // C_ROWS_DIV).to(tl.int64)
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :]
        c_mask = row_mask[:, None] & n_mask[None, :]
        if ATOMIC:
            tl.atomic_add(c_ptrs, out, mask=c_mask)
        else:
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)

    @_triton.jit
    def _packed_moe_kernel(
        a_ptr, w_ptr, w3_ptr, s_ptr, s3_ptr, c_ptr, topk_w_ptr,
        ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
        N, num_pairs, n_steps, steps_per_split, split_k,
        stride_am, stride_we, stride_ws, stride_wn, stride_se, stride_ss, stride_cm,
        ROUTE: tl.constexpr, BLOCK_P: tl.constexpr,
        A_ROWS_DIV: tl.constexpr, C_ROWS_DIV: tl.constexpr, FUSE_GATE_UP: tl.constexpr,
        MUL_ROUTED_WEIGHT: tl.constexpr, ATOMIC: tl.constexpr,
        BITS: tl.constexpr, OFFSET: tl.constexpr, PK: tl.constexpr, WIDTH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """Grid (N tiles x split_k, E for ROUTE_SCAN | sorted blocks for ROUTE_ALIGNED)."""
        pid_n = tl.program_id(0) // split_k
        pid_k = tl.program_id(0) % split_k
        if ROUTE == 0:
            expert = tl.program_id(1)
            offs_p = tl.arange(0, BLOCK_P)
            ids = tl.load(ids_ptr + offs_p, mask=offs_p < num_pairs, other=-1)
            mine = (ids == expert).to(tl.int32)
            count = tl.sum(mine, axis=0)
            if count == 0:  # an expert no token chose: nothing to read
                return
            # rank of each of my pairs among them: a [P, P] count (tl.cumsum's scan costs the
            # interpreter a re-patch per call; P <= 128, so the square is cheap either way)
            before = (offs_p[None, :] < offs_p[:, None]) & (mine[None, :] == 1)
            rank = tl.sum(before.to(tl.int32), axis=1)
            offs_m = tl.arange(0, BLOCK_M)
            for first in range(0, count, BLOCK_M):  # usually one pass; zero for idle experts
                pick = (mine[None, :] == 1) & (rank[None, :] == (first + offs_m)[:, None])
                pair_rows = tl.sum(tl.where(pick, offs_p[None, :], 0), axis=1)  # [BLOCK_M]
                _packed_tile(
                    a_ptr, w_ptr, w3_ptr, s_ptr, s3_ptr, c_ptr, topk_w_ptr,
                    pair_rows, first + offs_m < count, expert.to(tl.int64), pid_n, pid_k,
                    N, n_steps, steps_per_split,
                    stride_am, stride_we, stride_ws, stride_wn, stride_se, stride_ss, stride_cm,
                    A_ROWS_DIV, C_ROWS_DIV, FUSE_GATE_UP, MUL_ROUTED_WEIGHT, ATOMIC,
                    BITS, OFFSET, PK, WIDTH, BLOCK_M, BLOCK_N, USE_DOT, DOT_FP32,
                )  # fmt: skip
        else:
            pid_m = tl.program_id(1)
            if pid_m * BLOCK_M < tl.load(num_padded_ptr):
                pair_rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
                expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
                _packed_tile(
                    a_ptr, w_ptr, w3_ptr, s_ptr, s3_ptr, c_ptr, topk_w_ptr,
                    pair_rows, pair_rows < num_pairs, expert, pid_n, pid_k,
                    N, n_steps, steps_per_split,
                    stride_am, stride_we, stride_ws, stride_wn, stride_se, stride_ss, stride_cm,
                    A_ROWS_DIV, C_ROWS_DIV, FUSE_GATE_UP, MUL_ROUTED_WEIGHT, ATOMIC,
                    BITS, OFFSET, PK, WIDTH, BLOCK_M, BLOCK_N, USE_DOT, DOT_FP32,
                )  # fmt: skip

    @_triton.jit
    def _dequant_packed_kernel(
        w_ptr, s_ptr, out_ptr, N, stride_ws, stride_wn, stride_ss, stride_on,
        BITS: tl.constexpr, OFFSET: tl.constexpr, PK: tl.constexpr, WIDTH: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """out[N, K] = dequant(one expert); grid (N tiles, steps): each word read once."""
        step = tl.program_id(1)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_w = tl.arange(0, WIDTH)
        words = tl.load(w_ptr + step * stride_ws + offs_n[:, None] * stride_wn + offs_w[None, :],
                        mask=n_mask[:, None], other=0)  # fmt: skip
        if BITS == 4:
            scale = tl.load(s_ptr + step * stride_ss + offs_n, mask=n_mask, other=0.0)
        else:
            scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
        out_row = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + step * PK + offs_w[None, :]
        for i in tl.static_range(32 // BITS):
            bits = ((words >> (BITS * i)) & ((1 << BITS) - 1)) | 0x4B000000
            w = (bits.to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)) * scale.to(tl.float32)[
                :, None
            ]
            tl.store(out_row + i * WIDTH, w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


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
    _dequant_packed_kernel[(cdiv(n, block_n), one.n_steps)](
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
    block_p = max(64, _pow2(num_pairs))  # one compile serves every M <= 32 (top-2)
    grid = (cdiv(n, config.block_n) * split, blocks)
    _packed_moe_kernel[grid](
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
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, USE_DOT=use_dot,
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


def _dequantized(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: PackedWeight,
    w3: PackedWeight,
    w2: PackedWeight,
) -> torch.Tensor:
    """The dequant strategy: per hit expert, dense weights in x's dtype, then plain matmuls
    (one host sync for the per-expert counts: prefill only, never inside a CUDA graph)."""
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=int(w1.codes.shape[0])).tolist()
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
        gate = F.linear(xe, dequantize_expert(w1, expert, x.dtype))
        up = F.linear(xe, dequantize_expert(w3, expert, x.dtype))
        down = F.linear(F.silu(gate) * up, dequantize_expert(w2, expert, x.dtype))
        out.index_add_(0, tokens, down.float() * weights[pair_rows, None])
    return out.to(x.dtype)


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
    capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if launch.strategy == "dequant" and not capturing:
        return _dequantized(x, topk_weights, topk_ids, w1, w3, w2)
    if launch.strategy == "dequant":
        launch = replace(launch, strategy="aligned")
    return _grouped(x, topk_weights, topk_ids, w1, w3, w2, launch)
