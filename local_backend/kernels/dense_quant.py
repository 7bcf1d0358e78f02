"""Dense weight-only int8 / int4 linear layers (attention q/k/v/o, output head) in Triton.

    w = DenseQuantWeight.from_quantized(quantize_int4(weight))   # repacked once, at load
    y = dense_linear(x, w)                                        # x [..., K] -> y [..., N]
    reference_linear(x, w)                                        # the same in plain torch

The weights are repacked once, at load, into dense_layout.py's layout: N-major rows, each
int4 group's bytes holding its first half in the low nibbles and its second half in the high
ones (unpacked by a mask and a shift, each byte read once), scales beside as [groups, N].

Two forms of one kernel, chosen by the launch config (launch_configs.py, else `heuristic`):
- decode, M <= 32 rows: a GEMV over N blocks and K splits (split-K so every SM streams
  weights even at M = 1 for the 1024-row wk/wv); dot-free (broadcast multiply and row sums)
  for BLOCK_M < 16, tl.dot on [16 | 32, g/2] tiles otherwise. The K splits meet in one
  kernel: each writes an fp32 partial, and the last to arrive at a tile (an atomic counter
  it resets to 0 afterwards, so the launch stays CUDA-graph safe) sums them in split order,
  deterministic, without a memset or a second launch.
- prefill, M >= 64: tile GEMM, dequantize a [BLOCK_N, g] tile in registers and tl.dot it, or
  (mode "dequant") dequantize the whole matrix to the activation dtype and call cuBLAS, which
  wins at large M where the GEMM is compute bound and the dequantization is amortised.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import launch_configs
from .dense_layout import (
    DenseQuantWeight,
    reference_linear,
    repack_int4,
    restore_int4,
    unpack_int4_repacked,
)
from .runtime import (
    HAS_TRITON,
    cdiv,
    check_device,
    interpreting,
    next_power_of_2,
    sm_count,
    tile_counters,
    tl,
    triton,
)

__all__ = [
    "DenseConfig",
    "DenseQuantWeight",
    "dense_linear",
    "reference_linear",
    "repack_int4",
    "restore_int4",
    "unpack_int4_repacked",
]

KERNEL = "dense_quant"  # the configs/ folder of this kernel
log = logging.getLogger(__name__)
_UNLAUNCHABLE: set[DenseConfig] = set()  # configs that raised OutOfResources here


# -- launch configs -----------------------------------------------------------------------


@dataclass(frozen=True)
class DenseConfig:
    """One launch of the dense kernel. mode "fused" runs the kernel, "dequant" cuBLAS."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128  # int4: must equal the group size (one group per K step)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    mode: str = "fused"

    @property
    def uses_dot(self) -> bool:
        return self.block_m >= 16

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shape_key(weight: DenseQuantWeight) -> str:
    return f"{weight.format} N={weight.out_features} K={weight.in_features}"


def heuristic(weight: DenseQuantWeight, m: int, device: torch.device) -> DenseConfig:
    """Untuned defaults: GEMV with split-K up to 32 rows, tile GEMM above, cuBLAS at >= 1024
    rows on CUDA (where it is compute bound and cuBLAS's tiles beat ours).

    Sizes are chosen from sm_90 builds (scripts/compile_check_sm90.py, cuobjdump): no
    register spills. A thread's share of the weight tile stays <= 32-64 bytes (4 warps);
    larger tiles get 8 warps."""
    n, k = weight.out_features, weight.in_features
    group = weight.group_size if weight.format == "int4" else 0
    dot_ok = not group or group >= 32  # tl.dot needs half groups of >= 16 inputs
    cuda = device.type == "cuda"
    if m > 32:
        if cuda and m >= 1024:
            return DenseConfig(mode="dequant")
        if not dot_ok:
            return DenseConfig(block_m=8, block_n=32, block_k=group)
        return DenseConfig(block_m=64, block_n=64, block_k=group or 64, num_warps=8)
    # the dot-free form at a few rows (no padding to 16), tl.dot on 16 / 32-row tiles above
    dot_free = m <= 4 or not dot_ok
    block_m = min(next_power_of_2(m), 8) if dot_free else (16 if m <= 16 else 32)
    if not cuda:
        block_n, block_k = 16, group or 64
    elif group:
        block_n, block_k = (64 if block_m == 1 else 32), group
    else:
        block_n, block_k = 32, (256 if block_m == 1 else 128)
    if block_m >= 16:
        block_n = 64
    warps = 8 if block_m == 32 or (block_k if not group else block_k // 2) * block_n > 8192 else 4
    programs = cdiv(n, block_n) * cdiv(m, block_m)
    split = max(1, min(cdiv(2 * sm_count(device), programs), cdiv(k, block_k), 16))
    return DenseConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split,
                       num_warps=warps, num_stages=4)  # fmt: skip


def choose_config(weight: DenseQuantWeight, m: int, device: torch.device) -> DenseConfig:
    """The tuned config for this device, shape and row count, else the heuristic."""
    tuned = launch_configs.lookup(KERNEL, device, shape_key(weight), (m,))
    if tuned is not None:
        try:
            config = DenseConfig(**tuned)
            check_config(weight, config)
            return config
        except (TypeError, ValueError):
            pass  # a stale or foreign entry: the heuristic is always valid
    return heuristic(weight, m, device)


def check_config(weight: DenseQuantWeight, config: DenseConfig) -> None:
    if config.mode not in ("fused", "dequant"):
        raise ValueError(f"unknown mode {config.mode!r}")
    if config.mode == "dequant":
        return  # cuBLAS: no tiles of ours
    if weight.format == "int4" and config.block_k != weight.group_size:
        raise ValueError(f"int4 block_k must be the group size {weight.group_size}")
    if config.uses_dot and weight.format == "int4" and weight.group_size < 32:
        raise ValueError("tl.dot needs half groups of >= 16 inputs")
    for name in ("block_m", "block_n", "block_k"):
        value = getattr(config, name)
        if value != next_power_of_2(value):
            raise ValueError(f"{name} must be a power of two, got {value}")


# -- kernels --------------------------------------------------------------------------------

if HAS_TRITON:
    from triton.runtime.errors import OutOfResources

    @triton.jit
    def _dense_quant_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr,
        M, N, K, k_per_split, split_k,
        stride_xm, stride_wn, stride_sg, stride_ym, stride_ps,
        WEIGHT_FORMAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """y[M, N] = x[M, K] @ dequant(W)^T. Grid: (N blocks, split_k, M blocks); the split
        count is a runtime value (one compile serves every split count, which keeps the
        tuner's sweep short), SPLIT says whether there is more than one.

        int4: BLOCK_K is the group: one step reads BLOCK_K/2 bytes per row, unpacks the low
        nibbles (the group's first half) and high nibbles (second half), and scales the step's
        partial sum by the group scale. int8: the channel scale is applied once at the end.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < M
        col_mask = cols < N
        x_rows = x_ptr + rows[:, None] * stride_xm  # [BM, 1]
        w_rows = w_ptr + cols[:, None] * stride_wn  # [BN, 1]
        w_cols = w_ptr + cols[None, :] * stride_wn  # [1, BN]
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(K, k_begin + k_per_split)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            if WEIGHT_FORMAT == 2:
                half = tl.arange(0, BLOCK_K // 2)
                x_lo = tl.load(x_rows + (k0 + half)[None, :], mask=row_mask[:, None], other=0.0)
                x_hi = tl.load(
                    x_rows + (k0 + BLOCK_K // 2 + half)[None, :], mask=row_mask[:, None], other=0.0
                )  # fmt: skip
                if BLOCK_M >= 16:  # the tile loaded K-major ([BK/2, BN]): a dot operand as is
                    packed = tl.load(w_cols + (k0 // 2 + half)[:, None], mask=col_mask[None, :])
                    if DOT_FP32:
                        low = (packed & 0xF).to(tl.float32) - 8.0  # inputs k0 + j
                        high = (packed >> 4).to(tl.float32) - 8.0  # inputs k0 + BK/2 + j
                        part = tl.dot(x_lo.to(tl.float32), low, input_precision="ieee")
                        part = tl.dot(x_hi.to(tl.float32), high, part, input_precision="ieee")
                    else:  # straight to the activation dtype: half the registers of fp32
                        low = ((packed & 0xF).to(tl.int8) - 8).to(x_lo.dtype)
                        high = ((packed >> 4).to(tl.int8) - 8).to(x_lo.dtype)
                        part = tl.dot(x_lo, low)
                        part = tl.dot(x_hi, high, part)
                else:  # dot-free: each row of x against the whole tile, summed along K
                    packed = tl.load(w_rows + (k0 // 2 + half)[None, :], mask=col_mask[:, None])
                    low = (packed & 0xF).to(tl.float32) - 8.0  # [BN, BK/2]: inputs k0 + j
                    high = (packed >> 4).to(tl.float32) - 8.0  # inputs k0 + BK/2 + j
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for r in tl.static_range(BLOCK_M):
                        pick = (tl.arange(0, BLOCK_M) == r)[:, None]
                        xr_lo = tl.sum(tl.where(pick, x_lo.to(tl.float32), 0.0), axis=0)
                        xr_hi = tl.sum(tl.where(pick, x_hi.to(tl.float32), 0.0), axis=0)
                        sums = tl.sum(low * xr_lo[None, :] + high * xr_hi[None, :], axis=1)
                        part = tl.where(pick, sums[None, :], part)
                scale = tl.load(s_ptr + (k0 // BLOCK_K) * stride_sg + cols, mask=col_mask)
                acc += part * scale.to(tl.float32)[None, :]
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_end
                x = tl.load(x_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                            other=0.0)  # fmt: skip
                if BLOCK_M >= 16:  # K-major tile [BK, BN]
                    codes = tl.load(w_cols + offs_k[:, None],
                                    mask=k_mask[:, None] & col_mask[None, :], other=0)  # fmt: skip
                    if DOT_FP32:
                        acc = tl.dot(x.to(tl.float32), codes.to(tl.float32), acc,
                                     input_precision="ieee")  # fmt: skip
                    else:
                        acc = tl.dot(x, codes.to(x.dtype), acc)
                else:
                    codes = tl.load(w_rows + offs_k[None, :],
                                    mask=col_mask[:, None] & k_mask[None, :], other=0)  # fmt: skip
                    w32 = codes.to(tl.float32)
                    for r in tl.static_range(BLOCK_M):
                        pick = (tl.arange(0, BLOCK_M) == r)[:, None]
                        xr = tl.sum(tl.where(pick, x.to(tl.float32), 0.0), axis=0)
                        acc = tl.where(pick, acc + tl.sum(w32 * xr[None, :], axis=1)[None, :], acc)
        if WEIGHT_FORMAT == 1:
            channel = tl.load(s_ptr + cols, mask=col_mask, other=0.0)
            acc = acc * channel.to(tl.float32)[None, :]
        out_mask = row_mask[:, None] & col_mask[None, :]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
        if not SPLIT:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            tile_offs = rows[:, None] * N + cols[None, :]
            tl.store(part_ptr + pid_k * stride_ps + tile_offs, acc, mask=out_mask)
            tl.debug_barrier()  # every thread's partial is written before the release below
            tile = pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
            if arrived == split_k - 1:  # the last split of this tile: reduce in split order
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(split_k):
                    total += tl.load(part_ptr + s * stride_ps + tile_offs, mask=out_mask,
                                     other=0.0, cache_modifier=".cg")  # fmt: skip
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
                tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next launch (graph replay)

    @triton.jit
    def _dequant_int4_kernel(
        w_ptr, s_ptr, out_ptr, N, stride_wn, stride_sg, stride_on,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """out[N, K] = dequant(W) for the cuBLAS path. Grid: (N blocks, groups)."""
        pid_n = tl.program_id(0)
        group = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (cols < N)[:, None]
        half = tl.arange(0, GROUP // 2)
        rows = cols.to(tl.int64)[:, None]
        packed = tl.load(w_ptr + rows * stride_wn + (group * (GROUP // 2) + half)[None, :],
                         mask=mask)  # fmt: skip
        scale = tl.load(s_ptr + group * stride_sg + cols, mask=cols < N).to(tl.float32)[:, None]
        low = ((packed & 0xF).to(tl.float32) - 8.0) * scale
        high = ((packed >> 4).to(tl.float32) - 8.0) * scale
        base = out_ptr + rows * stride_on + group * GROUP
        tl.store(base + half[None, :], low.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(base + GROUP // 2 + half[None, :], high.to(out_ptr.dtype.element_ty), mask=mask)


def split_counters(device: torch.device, tiles: int = 1 << 16) -> torch.Tensor:
    """The shared tile counters of the split-K reduction (runtime.tile_counters)."""
    return tile_counters(device, tiles)


def dequantize_triton(weight: DenseQuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """The whole matrix in `dtype` ([N, K]), for the cuBLAS path."""
    if weight.format == "int8":
        return (weight.codes.to(dtype) * weight.scales.to(dtype)[:, None]).to(dtype)
    n, k = weight.out_features, weight.in_features
    out = torch.empty(n, k, device=weight.codes.device, dtype=dtype)
    block_n = 32
    _dequant_int4_kernel[(cdiv(n, block_n), k // weight.group_size)](
        weight.codes, weight.scales, out, n,
        weight.codes.stride(0), weight.scales.stride(0), out.stride(0),
        GROUP=weight.group_size, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out


def dense_linear(
    x: torch.Tensor, weight: DenseQuantWeight, config: DenseConfig | None = None
) -> torch.Tensor:
    """x [..., K] @ dequant(W)^T, W kept int8 / int4 in memory; y in x's dtype."""
    check_device(x, weight.codes)
    k = weight.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    explicit = config is not None  # the tuner's: an error must reach it, no fallback
    config = config or choose_config(weight, m, x.device)
    check_config(weight, config)
    if config.mode == "dequant" or config in _UNLAUNCHABLE:
        return F.linear(x, dequantize_triton(weight, x.dtype))
    try:
        return _launch(x, x2, weight, config)
    except Exception as exc:  # a config this GPU cannot hold (shared memory, registers)
        if explicit or not (HAS_TRITON and isinstance(exc, OutOfResources)):
            raise
        log.warning("dense_quant config %s does not fit this GPU (%s): cuBLAS instead", config, exc)
        _UNLAUNCHABLE.add(config)
        return F.linear(x, dequantize_triton(weight, x.dtype))


def _launch(
    x: torch.Tensor, x2: torch.Tensor, weight: DenseQuantWeight, config: DenseConfig
) -> torch.Tensor:
    m, n, k = x2.shape[0], weight.out_features, weight.in_features
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    k_blocks = cdiv(k, config.block_k)
    k_per_split = cdiv(k_blocks, config.split_k) * config.block_k
    split = cdiv(k, k_per_split)
    grid = (cdiv(n, config.block_n), split, cdiv(m, config.block_m))
    if split > 1:
        partials = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
        counters = split_counters(x.device, grid[0] * grid[2])
    else:
        partials = counters = y  # unused
    _dense_quant_kernel[grid](
        x2, weight.codes, weight.scales, y, partials, counters,
        m, n, k, k_per_split, split,
        x2.stride(0), weight.codes.stride(0), weight.scales.stride(0), y.stride(0),
        m * n,
        WEIGHT_FORMAT=weight.code, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT=split > 1,
        DOT_FP32=interpreting() or x.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)
