"""One decoder layer of the 8x22B at decode, timed and extrapolated to the whole model.

A one-layer Transformer with the 8x22B's shapes (random weights, quantized to the format the
memory plan would load) decodes one token per sequence at a given context with the triton
backend: eagerly and replayed from a CUDA graph (kernels.capture_decode). Per token the model
costs 56 layers plus the final norm and output head, measured separately:

    tokens/s = batch / (56 x layer + head)

against memory_plan.decode_tokens_per_s_bound: the bytes of weights one token reads over the
device's peak bandwidth (int4: ~170 tokens/s on an H100, ~240 on an H200). Run through
bench/moe_kernels.py, which writes the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from kernels_common import Device, time_ms

from local_backend import memory_plan
from local_backend.config import ModelConfig
from local_backend.kernels import capture_decode, install, select_backend
from local_backend.kv_cache import KVCache
from local_backend.model import Transformer, rope_cos_sin
from local_backend.quantize import quantize_model


@dataclass
class LayerResult:
    fmt: str
    model: str
    batch: int
    context: int
    n_layers: int
    layer_eager_ms: float
    layer_graph_ms: float | None  # None off CUDA (nothing to capture)
    torch_layer_ms: float | None  # the torch backend's layer (bf16 only)
    head_ms: float
    layer_bytes: int  # weights read by one layer for one step, plus its KV cache reads

    @property
    def layer_ms(self) -> float:
        return self.layer_graph_ms if self.layer_graph_ms is not None else self.layer_eager_ms

    @property
    def tokens_per_s(self) -> float:
        return self.batch * 1e3 / (self.n_layers * self.layer_ms + self.head_ms)


def layer_weight_bytes(config: ModelConfig, fmt: str) -> int:
    """Weights one decode token reads in one layer (top-k experts, attention, router, norms)."""
    whole = memory_plan.active_weight_bytes(config, fmt)
    head = config.vocab_size * config.dim * 2 + config.dim * 2  # output head and final norm
    return (whole - head) // config.n_layers


def bench_decoder_layer(
    fmt: str, device: torch.device, tiny: bool = False, batch: int = 1, context: int = 1024
) -> LayerResult:
    full = ModelConfig.from_name("small" if tiny else "wizardlm-2-8x22b")
    context = 128 if tiny else context
    config = dataclasses.replace(full, n_layers=1)
    torch.manual_seed(0)
    model = Transformer.from_config(config, device=device, dtype=torch.bfloat16)
    backend = select_backend(device, "triton")
    quantize_model(model, fmt, backend=backend)
    cache = KVCache(config, batch, context + 1, device=device, dtype=torch.bfloat16)
    cache.k.normal_()
    cache.v.normal_()
    tokens = torch.randint(0, config.vocab_size, (batch, 1), device=device)
    positions = torch.full((batch, 1), context, device=device)  # attends to context + 1 keys
    slots = torch.arange(batch, device=device)
    x = model.tok_embeddings(tokens)  # [B, 1, D]
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)
    layer = model.layers[0]

    def step(hidden: torch.Tensor) -> torch.Tensor:
        return layer(hidden, cos, sin, None, positions, cache, slots)

    with torch.no_grad():
        eager = time_ms(lambda: step(x))
        graph = capture_decode(step, x)
        graph_ms = time_ms(lambda: graph(x)) if graph.captured else None
        head = time_ms(lambda: model.output(model.norm(x)))
        torch_ms = None
        if fmt == "bf16":
            install(model, "torch")
            mask = model.attention_mask(positions, context + 1)
            torch_ms = time_ms(lambda: layer(x, cos, sin, mask, positions, cache, slots))
    kv_bytes = batch * (context + 1) * 2 * config.kv_dim * 2
    return LayerResult(
        fmt=fmt,
        model=full.name,
        batch=batch,
        context=context,
        n_layers=full.n_layers,
        layer_eager_ms=eager,
        layer_graph_ms=graph_ms,
        torch_layer_ms=torch_ms,
        head_ms=head,
        layer_bytes=layer_weight_bytes(full, fmt) + kv_bytes,
    )


def layer_table(rows: list[LayerResult], device: Device) -> str:
    peak = device.peak_bandwidth
    first = rows[0]
    lines = [
        f"Decoder layer ({first.model}, batch {first.batch}, context {first.context}), "
        f"extrapolated to {first.n_layers} layers + output head; bound = active weight bytes "
        "per token / peak bandwidth (memory_plan.decode_tokens_per_s_bound).",
        "",
        "| format | layer eager ms | layer graph ms | torch layer ms | layer GB/s | % of peak "
        "| tokens/s | bound tokens/s | % of bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        full = ModelConfig.from_name(r.model)
        bound = memory_plan.decode_tokens_per_s_bound(full, r.fmt, peak) if peak else None
        bandwidth = r.layer_bytes / (r.layer_ms / 1e3)
        graph = f"{r.layer_graph_ms:.3f}" if r.layer_graph_ms is not None else "-"
        torch_ms = f"{r.torch_layer_ms:.3f}" if r.torch_layer_ms is not None else "-"
        share = f"{100 * bandwidth / peak:.0f}%" if peak else "n/a"
        bound_text = f"{bound:.0f}" if bound else "n/a"
        of_bound = f"{100 * r.tokens_per_s / bound:.0f}%" if bound else "n/a"
        lines.append(
            f"| {r.fmt} | {r.layer_eager_ms:.3f} | {graph} | {torch_ms} | "
            f"{bandwidth / 1e9:.0f} | {share} | {r.tokens_per_s:.1f} | {bound_text} | "
            f"{of_bound} |"
        )
    return "\n".join(lines)
