"""The module forwards `install` puts on the model, and the quantized-weight plumbing.

Every forward here keeps the signature and the meaning of the model.py method it replaces
(see docs/architecture.md, "Model contract"); each is a plain function bound to one module
instance, so the model's classes stay untouched and `install(model, "torch")` undoes it.

Quantized experts live on the MoE module as buffers `w1_qweight`, `w1_scales` (same for w3,
w2) in place of the `w1` parameter, with `expert_format` and `expert_quant` (group size, input
features and pack step per matrix) beside them. They are stored in the packed layout
(packed.py: repacked once, at attach time, so the kernels stream them contiguously);
`expert_weights(moe)` gives them back as PackedWeight views. Quantized dense projections are
`QuantizedLinear` modules (the plain QuantizedWeight layout).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .decode_attention import decode_attention, write_kv_
from .fused_moe import fused_moe
from .packed import PackedWeight, repack
from .quant import QuantizedWeight, dequant_matmul
from .reference import ExpertWeight
from .rmsnorm import add_rms_norm, rms_norm
from .rotary import apply_rotary_

Backend = Literal["triton", "torch"]
EXPERT_MATRICES = ("w1", "w3", "w2")


# -- quantized weights on modules --------------------------------------------------------------


def attach_expert_weight(moe: Any, name: str, weight: QuantizedWeight | PackedWeight) -> None:
    """Replace MoE parameter `name` (w1, w2 or w3) by the packed buffers of `weight`."""
    packed = repack(weight) if isinstance(weight, QuantizedWeight) else weight
    if name not in EXPERT_MATRICES:
        raise ValueError(f"not an expert matrix: {name!r}")
    fmt = getattr(moe, "expert_format", "bf16")
    if fmt not in ("bf16", weight.format):
        raise ValueError(f"{name} is {weight.format} but the other experts are {fmt}")
    moe._parameters.pop(name, None)
    moe.register_buffer(f"{name}_qweight", packed.codes)
    moe.register_buffer(f"{name}_scales", packed.scales)
    moe.expert_format = weight.format
    quant: dict[str, tuple[int, int, int]] = moe.__dict__.setdefault("expert_quant", {})
    quant[name] = (packed.group_size, packed.in_features, packed.pack_k)


def is_quantized(moe: Any) -> bool:
    return getattr(moe, "expert_format", "bf16") != "bf16"


def expert_weights(moe: Any) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
    """(w1, w3, w2) of a MoE module: its parameters, or PackedWeight views of its buffers."""
    if not is_quantized(moe):
        return moe.w1, moe.w3, moe.w2
    fmt = moe.expert_format
    views = []
    for name in EXPERT_MATRICES:
        group, in_features, pack_k = moe.expert_quant[name]
        codes = getattr(moe, f"{name}_qweight")
        scales = getattr(moe, f"{name}_scales")
        views.append(PackedWeight(fmt, codes, scales, group, pack_k, in_features))
    return views[0], views[1], views[2]


class QuantizedLinear(nn.Module):
    """A bias-free nn.Linear whose weight is stored int8 / int4 (dense layers: attention)."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.format = weight.format
        self.group_size = weight.group_size
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.backend: Backend = "torch"

    def weight_view(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.format, self.qweight, self.scales, self.group_size, self.in_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            return dequant_matmul(x, self.weight_view())
        # torch: dequantize the matrix for this call (memory_plan's workspace counts it)
        return F.linear(x, self.weight_view().dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.format}"


# -- forwards ------------------------------------------------------------------------------------


def rmsnorm_triton(self: Any, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, self.weight, self.eps)


def block_triton(
    self: Any,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor,
    cache: Any,
    slots: torch.Tensor,
) -> torch.Tensor:
    """TransformerBlock with the residual add fused into the second norm."""
    attn = self.attention(self.attention_norm(x), cos, sin, mask, positions, cache, slots)
    # normed = ffn_norm(x + attn); the sum lands in attn's (fresh, contiguous) buffer
    normed, hidden = add_rms_norm(x, attn, self.ffn_norm.weight, self.ffn_norm.eps)
    return hidden + self.block_sparse_moe(normed)


def attention_triton(
    self: Any,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor,
    cache: Any,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Decode (T = 1): rotary in place, cache write, flash-decoding; no mask and no host sync.

    Prefill (T > 1) runs the model's own forward (there is no prefill attention kernel).
    """
    B, T, _ = x.shape
    if T != 1:
        return type(self).forward(self, x, cos, sin, mask, positions, cache, slots)
    H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
    q = self.wq(x).view(B, H, Dh)  # [B, 1, H*Dh] -> [B, H, Dh]
    k = self.wk(x).view(B, K, Dh)  # [B, 1, K*Dh] -> [B, K, Dh]
    v = self.wv(x).view(B, K, Dh)
    pos = positions.reshape(B)  # [B, 1] -> [B]
    # The model hands cos/sin per token ([B, 1, Dh]); row b of that table is token b's angles.
    rows = torch.where(pos >= 0, torch.arange(B, device=pos.device), -1)
    apply_rotary_(q, k, rows, cos.reshape(B, Dh), sin.reshape(B, Dh))
    layer = self.layer_id
    write_kv_(cache.k[layer], cache.v[layer], k, v, slots, pos)
    lengths = pos + 1  # attend to positions <= pos; padding (-1) attends to nothing
    out = decode_attention(q, cache.k[layer], cache.v[layer], slots, lengths)  # [B, H, Dh]
    return self.wo(out.view(B, 1, H * Dh))  # [B, H, Dh] -> [B, 1, H*Dh]


def moe_triton(self: Any, x: torch.Tensor) -> torch.Tensor:
    B, T, D = x.shape
    flat = x.reshape(B * T, D)  # [N, D]
    out = fused_moe(flat, self.gate(flat), self.top_k, *expert_weights(self))
    return out.view(B, T, D)


def moe_torch_quantized(self: Any, x: torch.Tensor) -> torch.Tensor:
    """The torch backend for quantized experts: the model's MoE.forward, step for step (same
    routing, same dtype), with each used expert dequantized to x's dtype for its matmuls.
    The model's own forward cannot run: w1/w2/w3 are no longer parameters."""
    B, T, D = x.shape
    flat = x.reshape(B * T, D)  # [N, D]
    weights, experts = self.route(flat)  # [N, k], [N, k]
    w1, w3, w2 = expert_weights(self)
    out = torch.zeros_like(flat)  # [N, D]
    for e in range(self.n_experts):
        token_idx, choice_idx = torch.where(experts == e)  # [n_e], [n_e]
        if token_idx.numel() == 0:  # skip dequantizing an expert nobody uses
            continue
        h = flat[token_idx]  # [n_e, D]
        gate = F.linear(h, reference.expert_matrix(w1, e, x.dtype))
        up = F.linear(h, reference.expert_matrix(w3, e, x.dtype))
        y = F.linear(F.silu(gate) * up, reference.expert_matrix(w2, e, x.dtype))  # [n_e, D]
        y = y * weights[token_idx, choice_idx, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out.view(B, T, D)
