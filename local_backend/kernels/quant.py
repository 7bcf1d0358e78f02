"""Weight-only quantization of expert matrices, and the dequant-in-GEMM tile helpers.

Formats (weights are [..., N, K] = [..., out_features, in_features], like nn.Linear):
- int8: symmetric, one fp16 scale per output channel: w ≈ q * scale[n], q in [-127, 127].
- int4: symmetric, one fp16 scale per group of `group_size` (default 128) input features,
  two values packed per byte along K (low nibble = even k, high nibble = odd k), stored with a
  +8 offset: w ≈ (nibble - 8) * scale[n, k // group_size], nibble - 8 in [-8, 7], the scale
  picked per group by a small clip search.
Activations stay bf16/fp32 (W8A16 / W4A16): decode is bound by weight bytes, not by math.
Scales are 2 bytes, as memory_plan.py counts them; fp16 rather than bf16 for 3 more bits of
mantissa (scales of real weights sit far inside fp16's range; they are clamped to it).

Inside a GEMM the integer codes are fed to `tl.dot` as bf16 (every integer in [-127, 127] is exact
in bf16) and the scales are applied to the fp32 partial sums: once at the end for int8
(per-channel), once per K block for int4 (BLOCK_K divides the group, so a block has one scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .runtime import HAS_TRITON, cdiv, check_device, interpreting, launch_options, tl, triton

# constexpr codes the kernels branch on
FMT_FLOAT, FMT_INT8, FMT_INT4 = 0, 1, 2
INT4_GROUP_SIZE = 128
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # int4 scale search (quantize_int4)
_FP16_TINY = 6.2e-5  # smallest normal fp16: a scale below it would lose precision
_FP16_MAX = 65504.0


@dataclass
class QuantizedWeight:
    """A quantized [..., N, K] weight: integer codes plus scales.

    qweight: int8 [..., N, K] (int8) | uint8 [..., N, K // 2] (int4, two codes per byte)
    scales: fp16 [..., N] (int8) | fp16 [..., N, K // group_size] (int4)
    """

    format: Literal["int8", "int4"]
    qweight: torch.Tensor
    scales: torch.Tensor
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[-2])

    @property
    def code(self) -> int:
        return FMT_INT8 if self.format == "int8" else FMT_INT4

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.format == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(self.qweight, self.scales, self.group_size, dtype)


def int4_group_size(in_features: int, preferred: int = INT4_GROUP_SIZE) -> int:
    """`preferred` when it divides K, else the largest power of two (>= 16) that does.

    Real shapes (K = 6144, 16384) always get 128; tiny test models get a smaller group.
    Groups must be powers of two >= 16 because a GEMM K block (>= 16 for tl.dot) divides them.
    """
    group = preferred
    while group >= 16:
        if in_features % group == 0:
            return group
        group //= 2
    raise ValueError(f"int4 needs in_features divisible by 16, got {in_features}")


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    w32 = w.detach().float()
    absmax = w32.abs().amax(dim=-1)  # [..., N]
    scales = (absmax / 127.0).clamp(_FP16_TINY, _FP16_MAX).to(torch.float16)
    q = torch.round(w32 / scales.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q, scales, int(w.shape[-1]), int(w.shape[-1]))


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scales.float()[..., None]).to(dtype)


def quantize_int4(
    w: torch.Tensor, group_size: int | None = None, clip_ratios: tuple[float, ...] = CLIP_RATIOS
) -> QuantizedWeight:
    """Symmetric int4 with a per-group scale chosen to minimise the group's squared error.

    Each group tries scale = ratio * absmax / 7 for each ratio in `clip_ratios` (1.0 = no
    clipping) and keeps the best: clipping a few outliers buys finer steps for the rest, a
    cheap load-time search (AWQ/GPTQ-style clip search) that lowers the error by ~10-20%
    on Gaussian-like weights. Codes are clamped to [-8, 7] (the -8 is only reached by clipping).
    """
    in_features = int(w.shape[-1])
    group = group_size or int4_group_size(in_features)
    if in_features % group or in_features % 2:
        raise ValueError(f"int4 group size {group} must divide in_features {in_features}")
    groups = w.detach().float().unflatten(-1, (in_features // group, group))  # [..., N, G, g]
    absmax = groups.abs().amax(dim=-1)  # [..., N, G]
    best_scales = best_error = None
    for ratio in clip_ratios:
        scales = (absmax * (ratio / 7.0)).clamp(_FP16_TINY, _FP16_MAX).to(torch.float16)
        s32 = scales.float()[..., None]
        error = (torch.round(groups / s32).clamp_(-8, 7) * s32 - groups).pow_(2).sum(-1)
        if best_scales is None or best_error is None:
            best_scales, best_error = scales, error
        else:
            better = error < best_error
            best_scales = torch.where(better, scales, best_scales)
            best_error = torch.minimum(error, best_error)
    assert best_scales is not None
    codes = torch.round(groups / best_scales.float()[..., None]).clamp_(-8, 7) + 8
    codes = codes.to(torch.uint8).flatten(-2)  # [..., N, K], values in [0, 15]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., N, K // 2]
    return QuantizedWeight("int4", packed.contiguous(), best_scales, group, in_features)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> int8 codes in [-8, 7], [..., K]."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)  # [..., K // 2, 2] -> [..., K]


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    codes = unpack_int4(packed).float()  # [..., N, K]
    per_element = scales.float().repeat_interleave(group_size, dim=-1)  # [..., N, K]
    return (codes * per_element).to(dtype)


def quantize(w: torch.Tensor, fmt: str) -> torch.Tensor | QuantizedWeight:
    """`w` unchanged for "bf16", else its QuantizedWeight; ValueError for an unknown format."""
    if fmt == "bf16":
        return w
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int4":
        return quantize_int4(w)
    raise ValueError(f"unknown weight format {fmt!r} (expected bf16, int8 or int4)")


# ---------------------------------------------------------------------------------------------
# Triton tile helpers shared by every dequant-in-GEMM kernel (fused MoE and the dense one below)

if HAS_TRITON:

    @triton.jit
    def weight_tile_ptrs(w_base, offs_k, offs_n, stride_wn, stride_wk, WEIGHT_FORMAT: tl.constexpr):
        """Pointers of a [BLOCK_K, BLOCK_N] weight tile of a [N, K] (int4: [N, K // 2]) matrix."""
        if WEIGHT_FORMAT == 2:
            return w_base + (offs_k // 2)[:, None] * stride_wk + offs_n[None, :] * stride_wn
        return w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    @triton.jit
    def accumulate_weight_tile(
        acc,
        a,
        w,
        offs_k,
        k_start,
        scale_ptrs,
        stride_sg,
        n_mask,
        WEIGHT_FORMAT: tl.constexpr,
        GROUP_K: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """acc += a @ dequant(w) for one K block.

        int4: unpack the nibble of each k, dot the integer codes, scale the partial sum by the
        block's group scale. int8 / float: plain dot (int8's per-channel scale comes later).
        `scale_ptrs` points at scales[expert, offs_n, 0].
        """
        # (no nested helper for the dot: each nested call costs the interpreter dearly)
        if WEIGHT_FORMAT == 2:
            shift = ((offs_k % 2) * 4)[:, None]
            codes = ((w.to(tl.int32) >> shift) & 0xF) - 8
            group_scale = tl.load(scale_ptrs + (k_start // GROUP_K) * stride_sg, mask=n_mask)
            if DOT_FP32:
                a32 = a.to(tl.float32)
                partial = tl.dot(a32, codes.to(tl.float32), input_precision="ieee")
            else:
                partial = tl.dot(a, codes.to(a.dtype))
            return acc + partial * group_scale.to(tl.float32)[None, :]
        if DOT_FP32:  # the interpreter's bf16 dot is wrong; fp32 weights want an exact dot
            return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, w.to(a.dtype), acc)

    @triton.jit
    def finish_channel_scale(acc, scale_ptrs, n_mask, WEIGHT_FORMAT: tl.constexpr):
        """int8: apply the per-output-channel scale to the finished fp32 accumulator."""
        if WEIGHT_FORMAT == 1:
            channel_scale = tl.load(scale_ptrs, mask=n_mask, other=0.0)
            return acc * channel_scale.to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _dequant_matmul_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ym, stride_yn,
        WEIGHT_FORMAT: tl.constexpr, GROUP_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """y[M, N] = x[M, K] @ dequant(W[N, K])^T; grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = weight_tile_ptrs(w_ptr, offs_k, offs_n, stride_wn, stride_wk, WEIGHT_FORMAT)
        scale_ptrs = s_ptr + offs_n * stride_sn
        w_step = BLOCK_K // 2 if WEIGHT_FORMAT == 2 else BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k_start
            a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
            acc = accumulate_weight_tile(
                acc, a, w, offs_k, k_start, scale_ptrs, stride_sg, n_mask,
                WEIGHT_FORMAT, GROUP_K, DOT_FP32,
            )  # fmt: skip
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += w_step * stride_wk
        acc = finish_channel_scale(acc, scale_ptrs, n_mask, WEIGHT_FORMAT)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def dequant_matmul(x: torch.Tensor, weight: QuantizedWeight | torch.Tensor) -> torch.Tensor:
    """Triton: x[..., K] @ W^T with W kept int8/int4 in memory (a dense dequant-in-GEMM).

    For dense layers that must shrink too (attention, lm_head) and as the smallest test of the
    tile helpers the fused MoE kernel shares.
    """
    check_device(x)
    if isinstance(weight, QuantizedWeight):
        w, scales, code, group = weight.qweight, weight.scales, weight.code, weight.group_size
        out_features, in_features = weight.out_features, weight.in_features
    else:
        w, scales, code, group = weight, weight, FMT_FLOAT, 1
        out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {in_features}")
    x2 = x.reshape(-1, in_features)  # [M, K], M = all leading dims
    m = x2.shape[0]
    y = torch.empty(m, out_features, device=x.device, dtype=x.dtype)
    block_m = 16 if m <= 16 else 64
    block_n = 64 if m <= 16 else 128
    block_k = min(64, group) if code == FMT_INT4 else 64
    scale_sn = scales.stride(-2) if code == FMT_INT4 else (scales.stride(-1) if code else 0)
    scale_sg = scales.stride(-1) if code == FMT_INT4 else 0
    grid = (cdiv(m, block_m), cdiv(out_features, block_n))
    _dequant_matmul_kernel[grid](
        x2, w, scales, y, m, out_features, in_features,
        x2.stride(0), x2.stride(1), w.stride(-2), w.stride(-1), scale_sn, scale_sg,
        y.stride(0), y.stride(1),
        WEIGHT_FORMAT=code, GROUP_K=max(group, 1), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, DOT_FP32=interpreting() or x.dtype == torch.float32,
        **launch_options(num_warps=4, num_stages=4),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features)
