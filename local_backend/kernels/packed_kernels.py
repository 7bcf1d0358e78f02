"""The Triton kernels of the packed MoE (host side, strategies and the layout's rationale:
packed_moe.py; the layout: packed.py). Importable without triton (nothing is defined then).

    packed_moe_kernel      one GEMM of the layer over packed experts, rows found by scanning
                            the routed pairs (ROUTE 0) or from aligned blocks (ROUTE 1)
    dequant_packed_kernel  one expert back to a dense matrix, each byte read once
"""

from __future__ import annotations

from .runtime import HAS_TRITON, tl
from .runtime import triton as _triton

if HAS_TRITON:

    @_triton.jit
    def packed_tile(
        a_ptr, w_ptr, w3_ptr, s_ptr, s3_ptr, c_ptr, topk_w_ptr,
        pair_rows, row_mask, expert, pid_n, pid_k,
        N, n_steps, steps_per_split,
        stride_am, stride_we, stride_ws, stride_wn, stride_se, stride_ss, stride_cm,
        A_ROWS_DIV: tl.constexpr, C_ROWS_DIV: tl.constexpr, FUSE_GATE_UP: tl.constexpr,
        MUL_ROUTED_WEIGHT: tl.constexpr, ATOMIC: tl.constexpr,
        BITS: tl.constexpr, OFFSET: tl.constexpr, PK: tl.constexpr, WIDTH: tl.constexpr,
        IN_PLACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
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
        # GEMV form (no tensor cores): the products stay [BLOCK_M, BLOCK_N, WIDTH] and are
        # reduced over WIDTH once, after the K loop (no cross-lane reduction per field)
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N, WIDTH), dtype=tl.float32)
        acc3 = acc
        for step in range(s_begin, s_end):
            words = tl.load(w_ptr + w_off + step * stride_ws, mask=n_mask[:, None], other=0)
            if FUSE_GATE_UP:
                words3 = tl.load(w3_ptr + w_off + step * stride_ws, mask=n_mask[:, None], other=0)
            if BITS == 4:  # one group per step: its scales, one contiguous [BLOCK_N] run
                scale = tl.load(s_ptr + s_off + step * stride_ss, mask=n_mask, other=0.0)
                scale = scale.to(tl.float32)
                if FUSE_GATE_UP:
                    scale3 = tl.load(s3_ptr + s_off + step * stride_ss, mask=n_mask, other=0.0)
                    scale3 = scale3.to(tl.float32)
            if not USE_DOT:  # GEMV: the step's products, scaled once per step (int4)
                part = tl.zeros((BLOCK_M, BLOCK_N, WIDTH), dtype=tl.float32)
                part3 = part
            # Decoding a field: mask it where it sits, OR in the exponent of 2^23 (the field
            # then lies in the fp32 mantissa, exact while BITS*(j+1) <= 23) and subtract
            # 2^23 + OFFSET*2^(BITS*j): code * 2^(BITS*j) in two integer and one float op, no
            # shift and no int-to-float conversion (both dearer on the ALUs). Fields from
            # IN_PLACE on come from the word shifted once. x is scaled by 2^-(BITS*j), exact.
            # (Written inline: a nested jit helper costs the interpreter a re-patch per call.)
            high = words >> (BITS * IN_PLACE)
            if FUSE_GATE_UP:
                high3 = words3 >> (BITS * IN_PLACE)
            for i in tl.static_range(32 // BITS):
                # field i of every word: inputs step*PK + i*WIDTH + [0, WIDTH)
                x = tl.load(a_base + (step * PK + i * WIDTH), mask=row_mask[:, None], other=0.0)
                if i < IN_PLACE:
                    j = i
                    src = words
                    if FUSE_GATE_UP:
                        src3 = words3
                else:
                    j = i - IN_PLACE
                    src = high
                    if FUSE_GATE_UP:
                        src3 = high3
                field_mask = ((1 << BITS) - 1) << (BITS * j)
                bias = 8388608.0 + OFFSET * (1 << (BITS * j))
                w = ((src & field_mask) | 0x4B000000).to(tl.float32, bitcast=True) - bias
                if FUSE_GATE_UP:
                    w3 = ((src3 & field_mask) | 0x4B000000).to(tl.float32, bitcast=True) - bias
                xs = x.to(tl.float32) * (1.0 / (1 << (BITS * j)))  # [BLOCK_M, W]
                if USE_DOT:
                    # tensor cores: the group scale goes into the weights (one multiply per
                    # weight, amortised over the block's rows), the dot accumulates into acc
                    # directly, so no per-step partial tile occupies registers
                    if BITS == 4:
                        w = w * scale[:, None]
                        if FUSE_GATE_UP:
                            w3 = w3 * scale3[:, None]
                    if DOT_FP32:  # the interpreter's bf16 dot is wrong; fp32 activations exact
                        acc = tl.dot(xs, tl.trans(w), acc, input_precision="ieee")
                        if FUSE_GATE_UP:
                            acc3 = tl.dot(xs, tl.trans(w3), acc3, input_precision="ieee")
                    else:  # bf16 operands: xs exact, the weight rounded as torch's dequant does
                        xb = xs.to(x.dtype)
                        acc = tl.dot(xb, tl.trans(w.to(x.dtype)), acc)
                        if FUSE_GATE_UP:
                            acc3 = tl.dot(xb, tl.trans(w3.to(x.dtype)), acc3)
                else:
                    x3 = xs[:, None, :]
                    part += x3 * w[None, :, :]
                    if FUSE_GATE_UP:
                        part3 += x3 * w3[None, :, :]
            if not USE_DOT:
                if BITS == 4:
                    acc += part * scale[None, :, None]
                    if FUSE_GATE_UP:
                        acc3 += part3 * scale3[None, :, None]
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
    def packed_moe_kernel(
        a_ptr, w_ptr, w3_ptr, s_ptr, s3_ptr, c_ptr, topk_w_ptr,
        ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
        N, num_pairs, n_steps, steps_per_split, split_k,
        stride_am, stride_we, stride_ws, stride_wn, stride_se, stride_ss, stride_cm,
        ROUTE: tl.constexpr, BLOCK_P: tl.constexpr,
        A_ROWS_DIV: tl.constexpr, C_ROWS_DIV: tl.constexpr, FUSE_GATE_UP: tl.constexpr,
        MUL_ROUTED_WEIGHT: tl.constexpr, ATOMIC: tl.constexpr,
        BITS: tl.constexpr, OFFSET: tl.constexpr, PK: tl.constexpr, WIDTH: tl.constexpr,
        IN_PLACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
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
                packed_tile(
                    a_ptr, w_ptr, w3_ptr, s_ptr, s3_ptr, c_ptr, topk_w_ptr,
                    pair_rows, first + offs_m < count, expert.to(tl.int64), pid_n, pid_k,
                    N, n_steps, steps_per_split,
                    stride_am, stride_we, stride_ws, stride_wn, stride_se, stride_ss, stride_cm,
                    A_ROWS_DIV, C_ROWS_DIV, FUSE_GATE_UP, MUL_ROUTED_WEIGHT, ATOMIC,
                    BITS, OFFSET, PK, WIDTH, IN_PLACE, BLOCK_M, BLOCK_N, USE_DOT, DOT_FP32,
                )  # fmt: skip
        else:
            pid_m = tl.program_id(1)
            if pid_m * BLOCK_M < tl.load(num_padded_ptr):
                pair_rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
                expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
                packed_tile(
                    a_ptr, w_ptr, w3_ptr, s_ptr, s3_ptr, c_ptr, topk_w_ptr,
                    pair_rows, pair_rows < num_pairs, expert, pid_n, pid_k,
                    N, n_steps, steps_per_split,
                    stride_am, stride_we, stride_ws, stride_wn, stride_se, stride_ss, stride_cm,
                    A_ROWS_DIV, C_ROWS_DIV, FUSE_GATE_UP, MUL_ROUTED_WEIGHT, ATOMIC,
                    BITS, OFFSET, PK, WIDTH, IN_PLACE, BLOCK_M, BLOCK_N, USE_DOT, DOT_FP32,
                )  # fmt: skip

    @_triton.jit
    def dequant_packed_kernel(
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
