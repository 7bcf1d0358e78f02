"""The module forwards `install` puts on the model, and the quantized-weight plumbing.

Every forward here keeps the signature and the meaning of the model.py method it replaces
(see docs/architecture.md, "Model contract"); each is a plain function bound to one module
instance, so the model's classes stay untouched and `install(model, "torch")` undoes it.

Quantized experts live on the MoE module as buffers `w1_qweight`, `w1_scales` (same for w3,
w2) in place of the `w1` parameter, with `expert_format` and `expert_quant` (group size, input
features and pack step per matrix) beside them. They are stored in the packed layout
(packed.py: repacked once, at attach time, so the kernels stream them contiguously);
`expert_weights(moe)` gives them back as PackedWeight views. Quantized dense projections are
`QuantizedLinear` modules (attention projections, optionally the output head), run by
dense_quant.dense_linear on the triton backend.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .decode_attention import decode_attention
from .dense_quant import DenseQuantWeight, dense_linear
from .fused_moe import fused_moe
from .packed import PackedWeight, repack
from .quant import QuantizedWeight
from .reference import ExpertWeight
from .rmsnorm import add_rms_norm, rms_norm
from .rotary import rotary_write_kv_

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
    """A bias-free nn.Linear whose weight is stored int8 / int4 (attention, the output head).

    Its buffers hold one of two layouts: quant.py's (`dense_layout` False: what the torch path
    and quantize.py speak) or dense_quant.py's repacked one (True: what the triton kernel
    reads). `set_backend` switches the layout in place, one matrix at a time, at install.
    """

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
        self.dense_layout = False

    def set_backend(self, backend: Backend) -> None:
        """Use `backend`'s forward, repacking (or restoring) the weight for it."""
        dense = backend == "triton"
        if dense != self.dense_layout:
            if dense:
                packed = DenseQuantWeight.from_quantized(self.weight_view())
                self.qweight, self.scales = packed.codes, packed.scales
            else:
                plain = self.dense_view().to_quantized()
                self.qweight, self.scales = plain.qweight, plain.scales
            self.dense_layout = dense
        self.backend = backend

    def weight_view(self) -> QuantizedWeight:
        """The weight in quant.py's layout (a conversion when the buffers hold the dense one)."""
        if self.dense_layout:
            return self.dense_view().to_quantized()
        return QuantizedWeight(
            self.format, self.qweight, self.scales, self.group_size, self.in_features
        )

    def dense_view(self) -> DenseQuantWeight:
        if not self.dense_layout:
            return DenseQuantWeight.from_quantized(self.weight_view())
        return DenseQuantWeight(
            self.format, self.qweight, self.scales, self.group_size, self.in_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            return dense_linear(x, self.dense_view())
        # torch: dequantize the matrix for this call (memory_plan's workspace counts it)
        return F.linear(x, self.weight_view().dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.format}"


# -- fused q/k/v ---------------------------------------------------------------------------


def fuse_qkv(attention: Any) -> None:
    """Concatenate wq, wk, wv into one [q_dim + 2 kv_dim, D] weight (`attention.qkv`), and
    make the three projections views of it (no second copy of the weights).

    At decode this is one GEMV launch instead of three, and the 1024-row wk / wv stop being
    GEMVs too small to fill the GPU on their own. Quantized projections must already hold
    dense_quant's layout (install sets the backend first). Mixed kinds stay unfused.
    """
    # Always rebuilt: a fused weight from before the projections changed (quantized after a
    # first install) would keep serving the old weights at decode and their memory.
    unfuse_qkv(attention)
    parts = [attention.wq, attention.wk, attention.wv]
    bounds, start = [], 0
    for part in parts:
        rows = int(part.out_features)
        bounds.append((start, start + rows))
        start += rows
    fused: DenseQuantWeight | torch.Tensor
    if all(isinstance(p, QuantizedLinear) and p.dense_layout for p in parts):
        views = [p.dense_view() for p in parts]
        first = views[0]
        if any((v.format, v.group_size) != (first.format, first.group_size) for v in views):
            return
        int4 = first.format == "int4"
        codes = torch.cat([v.codes for v in views])
        scales = torch.cat([v.scales for v in views], dim=-1 if int4 else 0).contiguous()
        fused = DenseQuantWeight(first.format, codes, scales, first.group_size, first.in_features)
        for part, (lo, hi) in zip(parts, bounds, strict=True):
            part.qweight = codes[lo:hi]
            part.scales = scales[:, lo:hi] if int4 else scales[lo:hi]
    elif all(type(p) is nn.Linear and p.bias is None for p in parts):
        if len({p.weight.dtype for p in parts}) != 1:
            return
        fused = torch.cat([p.weight.detach() for p in parts])
        for part, (lo, hi) in zip(parts, bounds, strict=True):
            part.weight = nn.Parameter(fused[lo:hi], requires_grad=False)
    else:
        return
    attention.__dict__["qkv"] = fused


def unfuse_qkv(attention: Any) -> None:
    """Forget the fused weight (the projections keep working on their own views)."""
    attention.__dict__.pop("qkv", None)


def qkv_projection(self: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q [B, H, Dh], k and v [B, Hkv, Dh] of a decode step x [B, 1, D]: views of one fused
    GEMV's output when the projections are fused, else three projections."""
    B = x.shape[0]
    H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
    fused = self.__dict__.get("qkv")
    if fused is None:
        return self.wq(x).view(B, H, Dh), self.wk(x).view(B, K, Dh), self.wv(x).view(B, K, Dh)
    if isinstance(fused, DenseQuantWeight):
        qkv = dense_linear(x.view(B, -1), fused)  # [B, (H + 2K) Dh]
    else:
        qkv = F.linear(x.view(B, -1), fused)
    q_end, k_end = H * Dh, (H + K) * Dh
    return (
        qkv[:, :q_end].view(B, H, Dh),
        qkv[:, q_end:k_end].view(B, K, Dh),
        qkv[:, k_end:].view(B, K, Dh),
    )


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
    H, Dh = self.n_heads, self.head_dim
    q, k, v = qkv_projection(self, x)  # [B, H, Dh], [B, K, Dh], [B, K, Dh]
    pos, slots32, lengths = decode_indices(cache, cos, positions, slots)
    layer = self.layer_id
    # The model hands cos/sin per token ([B, 1, Dh]); row b of that table is token b's angles.
    # One launch rotates q in place and writes the rotated k and v into the cache.
    rotary_write_kv_(q, k, v, pos, slots32, cos.reshape(B, Dh), sin.reshape(B, Dh),
                     cache.k[layer], cache.v[layer])  # fmt: skip
    out = decode_attention(q, cache.k[layer], cache.v[layer], slots32, lengths)  # [B, H, Dh]
    return self.wo(out.view(B, 1, H * Dh))  # [B, H, Dh] -> [B, 1, H*Dh]


def decode_indices(
    cache: Any, cos: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor
) -> tuple[Any, ...]:
    """(positions, slots, lengths) of a decode step, int32 [B] each, computed by the first
    layer and reused by the other 55: every layer gets the same positions and slots tensors,
    and a few tiny kernels x 56 layers add up to a real share of a captured step.

    lengths = positions + 1 (attend to positions <= pos; padding, -1, attends to nothing).
    The memo is keyed on the step's own cos table (a new tensor every forward and every
    decode_step call), so a graph capture records these kernels once, in layer 0, and no step
    sees another's."""
    key = (cos, positions, slots)
    memo = cache.__dict__.get("_decode_indices")
    if memo is not None and all(a is b for a, b in zip(memo[0], key, strict=True)):
        return memo[1]
    pos = positions.reshape(-1).to(torch.int32)  # [B, 1] -> [B]
    derived = (pos, slots.to(torch.int32), pos + 1)
    cache.__dict__["_decode_indices"] = (key, derived)
    return derived


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
