"""Rotary position embedding applied in place to q and k, HF rotate_half convention.

HF checkpoints (Mixtral, WizardLM-2) permute wq/wk rows so that rotary pairs dimension i with
i + D/2 (not 2i with 2i + 1 as in the original paper): out[:D/2] = x1 cos - x2 sin,
out[D/2:] = x2 cos + x1 sin. One program per token rotates all its q heads and k heads in one
launch, reading the cos/sin row of its position once; math in fp32, one rounding at the store.
Tokens at position -1 (padding) are left untouched.
"""

from __future__ import annotations

import torch

from .runtime import HAS_TRITON, check_device, next_power_of_2, tl, triton

if HAS_TRITON:

    @triton.jit
    def _rotate_heads(
        x_ptr, token, n_heads, stride_t, stride_h, cos, sin,
        BLOCK_H: tl.constexpr, HALF: tl.constexpr,
    ):  # fmt: skip
        """Rotate the [n_heads, 2 * HALF] rows of one token in place."""
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, HALF)
        mask = (heads < n_heads)[:, None]
        first = x_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
        x1 = tl.load(first, mask=mask, other=0.0)
        x2 = tl.load(first + HALF, mask=mask, other=0.0)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        tl.store(first, (a * cos - b * sin).to(x1.dtype), mask=mask)
        tl.store(first + HALF, (b * cos + a * sin).to(x2.dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
        n_q_heads, n_k_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_table,
        BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, HALF: tl.constexpr,
    ):  # fmt: skip
        """Grid: (tokens,)."""
        token = tl.program_id(0).to(tl.int64)
        position = tl.load(pos_ptr + token).to(tl.int64)
        if position >= 0:
            dims = tl.arange(0, HALF)
            cos = tl.load(cos_ptr + position * stride_table + dims)[None, :].to(tl.float32)
            sin = tl.load(sin_ptr + position * stride_table + dims)[None, :].to(tl.float32)
            _rotate_heads(q_ptr, token, n_q_heads, stride_qt, stride_qh, cos, sin, BLOCK_QH, HALF)
            _rotate_heads(k_ptr, token, n_k_heads, stride_kt, stride_kh, cos, sin, BLOCK_KH, HALF)


if HAS_TRITON:

    @triton.jit
    def _rotary_write_kv_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, slots_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
        n_q_heads, n_kv_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_table, stride_cs, stride_cl, stride_ch,
        BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, HALF: tl.constexpr,
    ):  # fmt: skip
        """Token t (grid: tokens): rotate its q heads in place with row t of cos/sin, write
        its rotated k heads and its v heads into the cache at (slots[t], pos[t]). -1: skip."""
        token = tl.program_id(0).to(tl.int64)
        position = tl.load(pos_ptr + token).to(tl.int64)
        if position >= 0:
            dims = tl.arange(0, HALF)
            cos = tl.load(cos_ptr + token * stride_table + dims)[None, :].to(tl.float32)
            sin = tl.load(sin_ptr + token * stride_table + dims)[None, :].to(tl.float32)
            _rotate_heads(q_ptr, token, n_q_heads, stride_qt, stride_qh, cos, sin, BLOCK_QH, HALF)
            slot = tl.load(slots_ptr + token).to(tl.int64)
            heads = tl.arange(0, BLOCK_KH)
            mask = (heads < n_kv_heads)[:, None]
            src = k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
            a = tl.load(src, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
            row = slot * stride_cs + position * stride_cl + heads[:, None] * stride_ch
            dest = k_cache_ptr + row + dims[None, :]
            out_ty = k_cache_ptr.dtype.element_ty
            # rounded to k's dtype first, as rotating k in place and then copying would
            tl.store(dest, (a * cos - b * sin).to(k_ptr.dtype.element_ty).to(out_ty), mask=mask)
            tl.store(dest + HALF, (b * cos + a * sin).to(k_ptr.dtype.element_ty).to(out_ty),
                     mask=mask)  # fmt: skip
            full = tl.arange(0, 2 * HALF)
            values = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + full[None, :],
                             mask=mask)  # fmt: skip
            tl.store(v_cache_ptr + row + full[None, :], values.to(v_cache_ptr.dtype.element_ty),
                     mask=mask)  # fmt: skip


def rotary_write_kv_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """Decode's rotary and cache write in one launch (one fewer kernel per layer per step):
    q [M, H, D] rotated in place with row m of cos / sin [M, >= D/2]; k [M, Hkv, D] rotated
    and v written into one layer's caches [S, L, Hkv, D] at (slots[m], positions[m]); rows at
    position -1 are left alone. = apply_rotary_ (rows m) then write_kv_, k aside."""
    check_device(q, k, v, k_cache)
    head_dim = q.shape[-1]
    half = head_dim // 2
    if head_dim % 2 or half != next_power_of_2(half):
        raise ValueError(f"rotary needs an even head_dim with a power-of-two half, got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(3) != 1 or c.stride() != k_cache.stride():
            raise ValueError(f"{name} must be contiguous in head_dim and strided like k_cache")
    if cos.stride(0) != sin.stride(0) or cos.shape[-1] < half:
        raise ValueError("cos / sin tables must be [tokens, >= head_dim // 2], alike")
    n_tokens = q.shape[0]
    _rotary_write_kv_kernel[(n_tokens,)](
        q, k, v, positions.reshape(-1).contiguous(), slots.reshape(-1).contiguous(), cos, sin,
        k_cache, v_cache, q.shape[1], k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_QH=next_power_of_2(q.shape[1]), BLOCK_KH=next_power_of_2(k.shape[1]), HALF=half,
        num_warps=4,
    )  # fmt: skip


def apply_rotary_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Rotate q [M, H, D] and k [M, Hkv, D] in place at positions [M] (-1 = leave as is).

    cos, sin: [max_positions, D // 2] (reference.rotary_tables), or HF's [max_positions, D]
    tables whose two halves repeat (only the first D // 2 columns are read). The last dim of
    q and k must be contiguous; leading dims may be strided views (e.g. of a fused qkv).
    """
    check_device(q, k, cos)
    head_dim = q.shape[-1]
    half = head_dim // 2
    if head_dim % 2 or half != next_power_of_2(half):
        raise ValueError(f"rotary needs an even head_dim with a power-of-two half, got {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("q, k, cos and sin must be contiguous in their last dim")
    if cos.shape[-1] < half or cos.stride(0) != sin.stride(0):
        raise ValueError("cos / sin tables must be [max_positions, >= head_dim // 2], alike")
    n_tokens = q.shape[0]
    if k.shape[0] != n_tokens or positions.numel() != n_tokens:
        raise ValueError("q, k and positions must agree on the number of tokens")
    positions = positions.reshape(-1).contiguous()
    _rotary_kernel[(n_tokens,)](
        q, k, positions, cos, sin, q.shape[1], k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        BLOCK_QH=next_power_of_2(q.shape[1]), BLOCK_KH=next_power_of_2(k.shape[1]), HALF=half,
        num_warps=4,
    )  # fmt: skip
