"""CUDA-graph capture of the decode step, for the engine.

At batch 1 a decode step of the 8x22B is ~56 x 15 kernel launches of a few microseconds of
work each; launch overhead alone would cost a large share of the ~4-6 ms bandwidth-bound step.
Replaying a captured graph launches them all at once.

    graph = capture_decode(step_fn, tokens, positions, slots)   # static input tensors
    logits = graph(new_tokens, new_positions, new_slots)        # copy in, replay, read out

`step_fn(*static_inputs)` must be capturable: fixed shapes, no host sync, no allocation that
depends on data. `decode_step` below is such a step for a model with the triton backend
installed (Transformer.forward is not: it checks bounds with a host sync and sizes its mask by
the largest position). Warm-up and capture *run* the step, writing the KV cache at the static
inputs' slots and positions: capture with a slot that is free (or about to be overwritten).
Off CUDA, `capture_decode` captures nothing and the returned object just calls `step_fn`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class DecodeGraph:
    """A captured decode step (or, off CUDA, the step itself) with a call-by-copy interface.

    The returned outputs are the graph's static tensors: read (or clone) them before the next
    call, which overwrites them.
    """

    def __init__(
        self,
        step_fn: Callable[..., Any],
        static_inputs: tuple[torch.Tensor, ...],
        warmup: int = 2,
    ) -> None:
        self.step_fn = step_fn
        self.static_inputs = static_inputs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_output: Any = None
        on_cuda = [t.device.type == "cuda" for t in static_inputs]
        if static_inputs and all(on_cuda) and torch.cuda.is_available():
            self._capture(warmup)
        elif any(on_cuda):
            raise ValueError("static inputs must all be on CUDA, or none of them")

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _capture(self, warmup: int) -> None:
        # Warm up on a side stream (autotuning, lazy init, allocator) as PyTorch recommends.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.step_fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_output = self.step_fn(*self.static_inputs)
        self.graph = graph

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if self.graph is None:
            return self.step_fn(*inputs)
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for i, (static, new) in enumerate(zip(self.static_inputs, inputs, strict=True)):
            if new.shape != static.shape:
                raise ValueError(
                    f"input {i} has shape {tuple(new.shape)}; this graph was captured for "
                    f"{tuple(static.shape)} (capture one graph per batch size)"
                )
            if new.data_ptr() != static.data_ptr():
                static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.static_output


def capture_decode(
    step_fn: Callable[..., Any], *static_inputs: torch.Tensor, warmup: int = 2
) -> DecodeGraph:
    """Capture `step_fn(*static_inputs)` in a CUDA graph (CUDA tensors), else a pass-through."""
    return DecodeGraph(step_fn, tuple(static_inputs), warmup=warmup)


def decode_step(
    model: Any,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: Any,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Transformer.forward for T = 1 without host syncs or data-dependent shapes.

    tokens, positions: [B, 1]; slots: [B]; returns float32 logits [B, 1, V]. With the triton
    backend installed the attention never reads a mask, so none is built; with the torch
    backend this is simply model(tokens, positions, cache, slots) (not capturable). The caller
    has validated ids and positions (no bounds check here: that check is the host sync).
    """
    from local_backend.model import rope_cos_sin

    from .rmsnorm import add_rms_norm

    config = model.config
    triton_attention = getattr(model, "kernel_backend", "torch") == "triton"
    if not triton_attention or config.sliding_window is not None or tokens.shape[1] != 1:
        return model(tokens, positions, cache, slots)
    x = model.tok_embeddings(tokens)  # [B, 1, D]
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)  # [B, 1, Dh]
    # TransformerBlock by hand: each residual add is fused into the norm that follows it, the
    # MoE's too (into the next layer's attention_norm, or the final norm): one elementwise
    # launch per layer fewer than layer by layer. Same roundings as block_triton.
    moe_out = None
    for layer in model.layers:
        if moe_out is None:
            normed = layer.attention_norm(x)
        else:  # x + moe_out, written into moe_out's buffer, and its norm
            normed, x = add_rms_norm(
                x, moe_out, layer.attention_norm.weight, layer.attention_norm.eps
            )
        attn = layer.attention(normed, cos, sin, None, positions, cache, slots)
        normed, x = add_rms_norm(x, attn, layer.ffn_norm.weight, layer.ffn_norm.eps)
        moe_out = layer.block_sparse_moe(normed)
    if moe_out is None:
        final = model.norm(x)
    else:
        final, _ = add_rms_norm(x, moe_out, model.norm.weight, model.norm.eps)
    return model.output(final).float()  # [B, 1, V]
