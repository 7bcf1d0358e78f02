"""Pure-torch references for every kernel: the torch backend runs these, the tests hold the
Triton kernels to them. Written for clarity, not speed; semantics follow HF Mixtral.

Shape legend: M tokens, K model dim, N / I expert intermediate dim, E experts, k top-k,
B sequences, H query heads, Hkv key/value heads, D head dim, S cache slots, L cache length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packed import PackedWeight
from .quant import QuantizedWeight

ExpertWeight = torch.Tensor | QuantizedWeight | PackedWeight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF/gpt-fast RMSNorm: normalise in fp32, round to x's dtype, then scale."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the block's residual add fused with the norm."""
    hidden = x + residual
    return rms_norm(hidden, weight, eps), hidden


def rotary_tables(
    max_positions: int, head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: fp32 [max_positions, D // 2] (HF computes the same angles, duplicated to D)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """HF rotate_half rotary on x: [M, heads, D] at positions [M]; rows at position -1 unchanged.

    out[:half] = x1 cos - x2 sin, out[half:] = x2 cos + x1 sin (x1, x2 = halves of x), in fp32.
    """
    valid = positions >= 0
    pos = positions.clamp_min(0)
    c = cos[pos][:, None, :]  # [M, 1, D/2]
    s = sin[pos][:, None, :]
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)  # [M, heads, D/2] each
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return torch.where(valid[:, None, None], rotated, x)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write k, v [M, Hkv, D] into one layer's caches [S, L, Hkv, D] at (slots[m],
    positions[m]); rows at position -1 (padding) are not written."""
    real = positions >= 0
    k_cache[slots[real], positions[real]] = k[real].to(k_cache.dtype)
    v_cache[slots[real], positions[real]] = v[real].to(v_cache.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """One query per sequence against its cache slot, grouped-query.

    q: [B, H, D]; k_cache, v_cache: [S, L, Hkv, D] (one layer); slots, seq_lens: [B].
    Sequence b attends to positions [0, seq_lens[b]) of slot slots[b]; a length of 0 gives 0.
    Returns [B, H, D] in q's dtype; softmax in fp32.
    """
    n_seq, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[2]
    scale = sm_scale if sm_scale is not None else head_dim**-0.5
    out = torch.zeros_like(q)
    for b in range(n_seq):
        length = int(seq_lens[b])
        if length == 0:
            continue
        keys = k_cache[int(slots[b]), :length].float()  # [len, Hkv, D]
        values = v_cache[int(slots[b]), :length].float()
        keys = keys.repeat_interleave(n_heads // n_kv_heads, dim=1)  # [len, H, D]
        values = values.repeat_interleave(n_heads // n_kv_heads, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), keys) * scale  # [H, len]
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), values).to(q.dtype)
    return out


def quantized_matmul(x: torch.Tensor, weight: ExpertWeight) -> torch.Tensor:
    """x [..., K] @ dequant(W [N, K])^T in fp32, cast back to x's dtype (quant.dequant_matmul)."""
    w = weight.float() if isinstance(weight, torch.Tensor) else weight.dequantize(torch.float32)
    return (x.float() @ w.t()).to(x.dtype)


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: fp32 softmax over experts, top-k, renormalised to sum 1.

    router_logits: [M, E] -> weights fp32 [M, k], expert ids int64 [M, k].
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def expert_matrix(weight: ExpertWeight, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert `expert` of a stacked [E, N, K] weight as a dense [N, K] matrix."""
    if isinstance(weight, PackedWeight):
        return weight.expert(expert).dequantize(dtype)
    if isinstance(weight, QuantizedWeight):
        single = QuantizedWeight(
            weight.format,
            weight.qweight[expert],
            weight.scales[expert],
            weight.group_size,
            weight.in_features,
        )
        return single.dequantize(dtype)
    return weight[expert].to(dtype)


def n_stacked(weight: ExpertWeight) -> int:
    """E of a stacked [E, N, K] weight, whatever its format."""
    if isinstance(weight, PackedWeight):
        return int(weight.codes.shape[0])
    if isinstance(weight, QuantizedWeight):
        return int(weight.qweight.shape[0])
    return int(weight.shape[0])


def moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: ExpertWeight,
    w3: ExpertWeight,
    w2: ExpertWeight,
) -> torch.Tensor:
    """sum_j topk_weights[m, j] * W2_e (silu(W1_e x) * W3_e x), e = topk_ids[m, j].

    x: [M, K]; w1, w3: [E, I, K]; w2: [E, K, I]. Each expert runs once on the tokens routed to
    it (experts with no tokens are skipped). Math in fp32, result in x's dtype.
    """
    n_experts = n_stacked(w1)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(n_experts):
        token_idx, slot = torch.where(topk_ids == expert)  # tokens routed here, and which of k
        if token_idx.numel() == 0:
            continue
        xe = x[token_idx].float()  # [m_e, K]
        gate = xe @ expert_matrix(w1, expert, torch.float32).t()  # [m_e, I]
        up = xe @ expert_matrix(w3, expert, torch.float32).t()
        down = (F.silu(gate) * up) @ expert_matrix(w2, expert, torch.float32).t()  # [m_e, K]
        out.index_add_(0, token_idx, down * topk_weights[token_idx, slot, None].float())
    return out.to(x.dtype)


def moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    w1: ExpertWeight,
    w3: ExpertWeight,
    w2: ExpertWeight,
) -> torch.Tensor:
    """The whole sparse MoE block from router logits: x [M, K], logits [M, E] -> [M, K]."""
    weights, ids = route(router_logits, top_k)
    return moe_experts(x, weights, ids, w1, w3, w2)
