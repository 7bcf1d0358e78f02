"""Custom kernels for the local backend: Triton on CUDA, pure torch everywhere else.

    select_backend(device, override=None) -> "triton" | "torch"   THE one place the choice is made
    install(model, backend) -> model          put that backend's forwards on the model's modules
    capture_decode(step_fn, *static_inputs)   CUDA-graph the decode step (a no-op off CUDA)
    decode_step(model, tokens, positions, cache, slots)   a sync-free T = 1 forward to capture

What "triton" installs (each kernel beside its torch reference in reference.py):

    RMSNorm            rmsnorm.rms_norm
    TransformerBlock   the residual add fused into ffn_norm (rmsnorm.add_rms_norm)
    Attention          at decode: one fused q/k/v GEMV (wq, wk, wv become views of one
                       weight: forwards.fuse_qkv), rotary and cache write in one launch
                       (rotary.rotary_write_kv_), flash-decoding (decode_attention.py); prefill
                       keeps the model's forward
    MoE                fused_moe.fused_moe: top-2 routing, grouped GEMMs over experts, bf16 or
                       int8/int4 experts dequantized inside the GEMM (quant.py)
    QuantizedLinear    dense_quant.dense_linear: the int8/int4 attention projections (and output
                       head, when quantized) repacked at install for a split-K GEMV at decode
                       and a tile GEMM or dequantize-then-cuBLAS at prefill

"torch" restores the model's own forwards, except that quantized experts and projections (which
the model's code cannot read) run the reference dequantizing path.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args

import torch
from torch import nn

from . import forwards
from .cuda_graph import DecodeGraph, capture_decode, decode_step
from .forwards import Backend, QuantizedLinear
from .runtime import HAS_TRITON, TritonUnavailable, interpreting

if TYPE_CHECKING:
    from local_backend.model import Transformer

__all__ = [
    "Backend",
    "DecodeGraph",
    "QuantizedLinear",
    "TritonUnavailable",
    "capture_decode",
    "decode_step",
    "install",
    "select_backend",
]


def select_backend(device: torch.device | str, override: str | None = None) -> Backend:
    """Triton on a CUDA device with triton installed, else torch; `override` forces one.

    Forcing "triton" off CUDA is allowed only where triton runs its interpreter (tests); a
    forced choice that cannot run raises TritonUnavailable with the reason, never later.
    """
    device = torch.device(device)
    if override is not None:
        if override not in get_args(Backend):
            raise ValueError(f"unknown kernel backend {override!r} (expected triton or torch)")
        if override == "triton":
            if not HAS_TRITON:
                raise TritonUnavailable("kernel backend 'triton' needs the triton package")
            if device.type != "cuda" and not interpreting():
                raise TritonUnavailable(
                    f"kernel backend 'triton' cannot run on {device} (no CUDA, interpreter off)"
                )
        return "triton" if override == "triton" else "torch"
    return "triton" if device.type == "cuda" and HAS_TRITON else "torch"


def _set_forward(module: nn.Module, fn: Callable[..., Any] | None) -> None:
    """Bind `fn` as this instance's forward; None restores the class's own."""
    module.__dict__.pop("forward", None)
    if fn is not None:
        module.forward = types.MethodType(fn, module)  # type: ignore[method-assign]


def install(model: Transformer, backend: Backend) -> Transformer:
    """Put `backend`'s forwards on every module of `model` (idempotent; returns the model)."""
    from local_backend.model import Attention, MoE, RMSNorm, TransformerBlock

    if backend not in get_args(Backend):
        raise ValueError(f"unknown kernel backend {backend!r} (expected triton or torch)")
    triton = backend == "triton"
    if triton and not HAS_TRITON:
        raise TritonUnavailable("kernel backend 'triton' needs the triton package")
    # flash-decoding has no sliding window; the model's attention handles one
    windowed = getattr(getattr(model, "config", None), "sliding_window", None) is not None
    for module in model.modules():
        if isinstance(module, RMSNorm):
            _set_forward(module, forwards.rmsnorm_triton if triton else None)
        elif isinstance(module, TransformerBlock):
            _set_forward(module, forwards.block_triton if triton else None)
        elif isinstance(module, Attention):
            _set_forward(module, forwards.attention_triton if triton and not windowed else None)
        elif isinstance(module, MoE):
            if triton:
                _set_forward(module, forwards.moe_triton)
            else:
                quantized = forwards.is_quantized(module)
                _set_forward(module, forwards.moe_torch_quantized if quantized else None)
        elif isinstance(module, QuantizedLinear):
            module.set_backend(backend)
    # after the projections took their layout: fuse q/k/v for the decode GEMV (triton)
    for module in model.modules():
        if isinstance(module, Attention):
            fuse = triton and not windowed
            (forwards.fuse_qkv if fuse else forwards.unfuse_qkv)(module)
    # a plain attribute (nn.Module's typed __setattr__ only admits tensors and modules)
    model.__dict__["kernel_backend"] = backend  # read by decode_step and quantize
    return model
