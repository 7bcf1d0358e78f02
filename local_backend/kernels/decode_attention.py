"""Decode attention over the static KV cache: grouped-query, split over the sequence
(flash-decoding), per-sequence lengths.

At decode each sequence has one query per head, so a program per (sequence, head) would leave
an H100 idle at batch 1 (8 KV heads = 8 programs) and would read each K/V row once per query
head. Instead:
- one program handles one KV head and *all* its query heads (6 at 8x22B, padded to 16 rows
  so scores are a tensor-core dot), so each K/V row is read from HBM once;
- the sequence is cut into splits, one program each (grid: sequences x KV heads x splits),
  each writing a partial output and its log-sum-exp; the last split of a (sequence, KV head)
  to finish merges them (an atomic counter, reset after: no second launch, graph safe).
The split count depends only on static shapes (batch, cache length, SM count), so the launch
is CUDA-graph safe; each sequence's *actual* length is divided among the splits on the device
(a 1k-token sequence in a 64k cache still spreads over every split, rather than leaving all
but the first idle), and splits past the end return at once.

Launch configs are data: `choose_config` reads the tuned entry for this device and shape
(launch_configs.py, kernel "decode_attention", shape "H=48 Hkv=8 D=128", buckets batch x
cache length) and falls back to `heuristic_config` on devices never tuned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import launch_configs
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

BLOCK_N = 64  # keys per inner step: [16, 128] x [128, 64] dots, a 16 KB bf16 K tile
MIN_SPLIT = 256  # below this a split costs more in merge traffic than it wins in parallelism


KERNEL = "decode_attention"  # the configs/ folder of this kernel


def choose_num_splits(batch: int, n_kv_heads: int, max_len: int, device: torch.device) -> int:
    """Enough (sequence, KV head, split) programs to fill the GPU about twice over."""
    programs = batch * n_kv_heads
    wanted = cdiv(2 * sm_count(device), programs)
    return max(1, min(wanted, cdiv(max_len, MIN_SPLIT)))


@dataclass(frozen=True)
class AttentionConfig:
    num_splits: int
    block_n: int = BLOCK_N
    num_warps: int = 4
    num_stages: int = 3

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shape_key(n_heads: int, n_kv_heads: int, head_dim: int) -> str:
    return f"H={n_heads} Hkv={n_kv_heads} D={head_dim}"


def heuristic_config(
    batch: int, n_kv_heads: int, max_len: int, device: torch.device
) -> AttentionConfig:
    """On CUDA 8 warps: at 4 the sm_90 build of a 64-key block spills registers (cuobjdump)."""
    splits = choose_num_splits(batch, n_kv_heads, max_len, device)
    if device.type == "cuda":
        return AttentionConfig(num_splits=splits, block_n=64, num_warps=8, num_stages=3)
    return AttentionConfig(num_splits=splits)


def choose_config(
    batch: int, n_heads: int, n_kv_heads: int, head_dim: int, max_len: int, device: torch.device
) -> AttentionConfig:
    """The tuned config nearest (batch, cache length) on this device, else the heuristic."""
    key = shape_key(n_heads, n_kv_heads, head_dim)
    tuned = launch_configs.lookup(KERNEL, device, key, (batch, max_len))
    if tuned is not None:
        try:
            config = AttentionConfig(**tuned)
            if config.num_splits >= 1 and config.block_n == next_power_of_2(config.block_n) >= 16:
                return config
        except TypeError:
            pass  # a stale entry: the heuristic is always valid
    return heuristic_config(batch, n_kv_heads, max_len, device)


if HAS_TRITON:

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, slots_ptr, lens_ptr, out_ptr, lse_ptr, final_ptr, count_ptr,
        sm_scale_log2,
        stride_qb, stride_qh,
        stride_ks, stride_kl, stride_kh, stride_vs, stride_vl, stride_vh,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_fb, stride_fh,
        GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """Partial attention of one split, and the merge by the last split of a (sequence, KV
        head) to finish (see _fold_splits). Grid: (B, Hkv, splits)."""
        seq = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        length = tl.load(lens_ptr + seq)
        # this sequence's length, cut into num_programs(2) runs of whole BLOCK_N blocks
        split_len = tl.cdiv(tl.cdiv(length, tl.num_programs(2)), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(length, start + split_len)
        heads = kv_head * GROUP + tl.arange(0, BLOCK_H)  # the query heads sharing this KV head
        head_mask = tl.arange(0, BLOCK_H) < GROUP
        dims = tl.arange(0, HEAD_DIM)
        lse_ptrs = lse_ptr + seq * stride_lb + heads * stride_lh + split
        out_ptrs = (
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os
            + dims[None, :]
        )  # fmt: skip
        if start >= end:  # nothing of this sequence in this split: a neutral partial
            tl.store(lse_ptrs, tl.full((BLOCK_H,), float("-inf"), tl.float32), mask=head_mask)
            tl.store(out_ptrs, tl.zeros((BLOCK_H, HEAD_DIM), tl.float32), mask=head_mask[:, None])
            _fold_splits(
                out_ptr, lse_ptr, final_ptr, count_ptr, seq, kv_head, heads, head_mask,
                stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_fb, stride_fh,
                HEAD_DIM,
            )  # fmt: skip
            return

        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
            mask=head_mask[:, None], other=0.0,
        )  # fmt: skip
        slot = tl.load(slots_ptr + seq).to(tl.int64)
        k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
        v_base = v_ptr + slot * stride_vs + kv_head * stride_vh
        row_max = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, HEAD_DIM), tl.float32)
        for block_start in range(start, end, BLOCK_N):
            positions = block_start + tl.arange(0, BLOCK_N)
            pos_mask = positions < end
            keys = tl.load(
                k_base + positions[:, None] * stride_kl + dims[None, :],
                mask=pos_mask[:, None], other=0.0,
            )  # fmt: skip
            values = tl.load(
                v_base + positions[:, None] * stride_vl + dims[None, :],
                mask=pos_mask[:, None], other=0.0,
            )  # fmt: skip
            if DOT_FP32:
                scores = tl.dot(q.to(tl.float32), tl.trans(keys.to(tl.float32)))
            else:  # a cache kept in another dtype than the activations is cast on the fly
                scores = tl.dot(q, tl.trans(keys.to(q.dtype)))
            scores = tl.where(pos_mask[None, :], scores * sm_scale_log2, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))  # finite: >= 1 valid key
            correction = tl.exp2(row_max - new_max)
            probs = tl.exp2(scores - new_max[:, None])  # [BLOCK_H, BLOCK_N]
            row_sum = row_sum * correction + tl.sum(probs, axis=1)
            if DOT_FP32:
                acc = acc * correction[:, None] + tl.dot(probs, values.to(tl.float32))
            else:
                acc = acc * correction[:, None] + tl.dot(probs.to(q.dtype), values.to(q.dtype))
            row_max = new_max
        tl.store(out_ptrs, acc / row_sum[:, None], mask=head_mask[:, None])
        tl.store(lse_ptrs, row_max + tl.log2(row_sum), mask=head_mask)  # log2 domain
        _fold_splits(
            out_ptr, lse_ptr, final_ptr, count_ptr, seq, kv_head, heads, head_mask,
            stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_fb, stride_fh, HEAD_DIM,
        )  # fmt: skip

    @triton.jit
    def _fold_splits(
        part_ptr, lse_ptr, final_ptr, count_ptr, seq, kv_head, heads, head_mask,
        stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_fb, stride_fh,
        HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        """The last split of (seq, kv_head) to arrive merges all the splits' partials of its
        query heads in split order (online log-sum-exp): one launch fewer per layer than a
        separate merge kernel. Its counter goes back to 0 (CUDA-graph replays)."""
        n_splits = tl.num_programs(2)
        tl.debug_barrier()  # every thread's partial is written before the release below
        counter = count_ptr + seq * tl.num_programs(1) + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == n_splits - 1:
            dims = tl.arange(0, HEAD_DIM)
            top = tl.full(heads.shape, float("-inf"), tl.float32)
            weight = tl.zeros(heads.shape, tl.float32)
            acc = tl.zeros((heads.shape[0], HEAD_DIM), tl.float32)
            for s in range(n_splits):
                lse = tl.load(lse_ptr + seq * stride_lb + heads * stride_lh + s, mask=head_mask,
                              other=float("-inf"), cache_modifier=".cg")  # fmt: skip
                part = tl.load(
                    part_ptr + seq * stride_pb + heads[:, None] * stride_ph + s * stride_ps
                    + dims[None, :], mask=head_mask[:, None], other=0.0, cache_modifier=".cg",
                )  # fmt: skip
                new_top = tl.maximum(top, lse)
                safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # all empty so far
                old_scale = tl.exp2(top - safe)
                new_scale = tl.exp2(lse - safe)
                acc = acc * old_scale[:, None] + part * new_scale[:, None]
                weight = weight * old_scale + new_scale
                top = new_top
            merged = acc / tl.maximum(weight, 1e-30)[:, None]  # an empty sequence: zeros
            tl.store(
                final_ptr + seq * stride_fb + heads[:, None] * stride_fh + dims[None, :],
                merged.to(final_ptr.dtype.element_ty), mask=head_mask[:, None],
            )  # fmt: skip
            tl.atomic_xchg(counter, 0)


if HAS_TRITON:

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, pos_ptr,
        row_len, stride_kt, stride_vt, stride_cs, stride_cl,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Copy one token's [Hkv * D] key and value rows into its slot at its position, unless
        the position is -1 (padding). Grid: (tokens,)."""
        token = tl.program_id(0).to(tl.int64)
        position = tl.load(pos_ptr + token).to(tl.int64)
        if position >= 0:
            slot = tl.load(slots_ptr + token).to(tl.int64)
            cols = tl.arange(0, BLOCK)
            mask = cols < row_len
            dest = slot * stride_cs + position * stride_cl + cols
            key = tl.load(k_ptr + token * stride_kt + cols, mask=mask)
            value = tl.load(v_ptr + token * stride_vt + cols, mask=mask)
            tl.store(k_cache_ptr + dest, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + dest, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write k, v [M, Hkv, D] into one layer's caches [S, L, Hkv, D] at (slots[m],
    positions[m]); rows at position -1 are skipped. No host sync (CUDA-graph safe), unlike
    boolean indexing."""
    check_device(k, k_cache)
    n_tokens = k.shape[0]
    row_len = k.shape[1] * k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"{name} rows [Hkv, D] must be contiguous")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(3) != 1 or c.stride(2) != c.shape[3] or c.stride() != k_cache.stride():
            raise ValueError(f"{name} rows [Hkv, D] must be contiguous and alike")
    _write_kv_kernel[(n_tokens,)](
        k, v, k_cache, v_cache, slots.to(torch.int32).contiguous(),
        positions.to(torch.int32).contiguous(),
        row_len, k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1),
        BLOCK=next_power_of_2(row_len), num_warps=4,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Triton flash-decoding; same contract as reference.decode_attention.

    q: [B, H, D]; k_cache, v_cache: [S, L, Hkv, D] (one layer of the KVCache, any strides with
    a contiguous last dim); slots, seq_lens: [B] int. Returns [B, H, D] in q's dtype.
    `config` (or just `num_splits`) overrides the tuned / heuristic launch config.
    """
    check_device(q, k_cache, v_cache)
    batch, n_heads, head_dim = q.shape
    _, max_len, n_kv_heads, _ = k_cache.shape
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv_heads} KV heads")
    if head_dim != next_power_of_2(head_dim) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous in head_dim")
    group = n_heads // n_kv_heads
    scale = sm_scale if sm_scale is not None else head_dim**-0.5
    if config is None:
        config = choose_config(batch, n_heads, n_kv_heads, head_dim, max_len, q.device)
    splits = num_splits or config.num_splits
    partial = torch.empty(batch, n_heads, splits, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, n_heads, splits, device=q.device, dtype=torch.float32)
    slots = slots.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    counters = tile_counters(q.device, batch * n_kv_heads)
    _decode_split_kernel[(batch, n_kv_heads, splits)](
        q, k_cache, v_cache, slots, seq_lens, partial, lse, out, counters,
        scale * 1.4426950408889634,  # exp(x) = exp2(x * log2(e))
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_H=max(16, next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=config.block_n, DOT_FP32=interpreting() or q.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
