"""The MoE layer at 8x22B shapes, fused Triton kernel against the torch reference and
transformers' MixtralSparseMoeBlock on the same device in one run; then a whole decoder layer
extrapolated to 56 layers (bench/decoder_layer.py). Writes docs/benchmarks.md.

    python bench/moe_kernels.py            # on a CUDA GPU: hidden 6144, inter 16384, E 8, top-2
    python bench/moe_kernels.py --tiny     # CPU smoke run at tiny shapes (labelled as such)
    ... [--out DIR] [--no-doc] [--no-layer]  # JSON to DIR (default bench/out)

Columns: median time per call (routing included), eagerly and (CUDA, M <= 64, the decode
sizes the engine captures) replayed from a CUDA graph; achieved bandwidth (bytes of the
experts actually hit: codes + scales, plus activations, over the best of the two times) as a
share of the datasheet peak HBM bandwidth; the speedup of the fused kernel over the torch
path (dequantize each hit expert, then matmul). M = 1, 2, 4, 8, 16, 32, 64, 512, 4096 tokens.
Without CUDA and without --tiny it refuses: the figures mean nothing off a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from decoder_layer import LayerResult, bench_decoder_layer, layer_table
from kernels_common import OUT, QUICK, Device, detect_device, time_ms, write_section

from local_backend.config import ModelConfig
from local_backend.kernels import forwards
from local_backend.kernels.moe_configs import config_dirs
from local_backend.kernels.quant import QuantizedWeight, quantize
from local_backend.model import MoE


@dataclass(frozen=True)
class Shapes:
    dim: int
    inter: int
    experts: int = 8
    top_k: int = 2
    tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 512, 4096)


REAL = Shapes(6144, 16384)
TINY = Shapes(128, 256, tokens=(1, 8))
GRAPH_MAX_TOKENS = 64  # decode batch sizes: the engine replays these from CUDA graphs
TIME_BUDGET_MS = {"each": 2000.0}  # --budget-ms: wall time spent on one measurement


def timed(fn: Callable[[], object]) -> float:
    return time_ms(fn, budget_ms=TIME_BUDGET_MS["each"])


FORMATS = ("bf16", "int8", "int4")


@dataclass
class MoERow:
    fmt: str
    tokens: int
    fused_ms: float
    torch_ms: float
    hf_ms: float | None
    bytes_moved: int
    graph_ms: float | None = None  # the fused layer replayed from a CUDA graph

    @property
    def best_ms(self) -> float:
        return min(self.fused_ms, self.graph_ms or self.fused_ms)

    def bandwidth(self) -> float:
        return self.bytes_moved / (self.best_ms / 1e3)


def build_moe(shapes: Shapes, fmt: str, device: torch.device, source: MoE) -> MoE:
    """A model.MoE holding `source`'s weights in `fmt` (quantized buffers for int8/int4)."""
    config = ModelConfig(
        dim=shapes.dim, n_heads=1, n_kv_heads=1, head_dim=2, intermediate=shapes.inter,
        n_experts=shapes.experts, top_k=shapes.top_k, name="bench",
    )  # fmt: skip
    with torch.device("meta"):
        moe = MoE(config)
    moe.gate = source.gate
    for name in forwards.EXPERT_MATRICES:
        weight = getattr(source, name)
        if fmt == "bf16":
            moe._parameters[name] = weight
        else:
            quantized = quantize(weight.data, "int8" if fmt == "int8" else "int4")
            assert isinstance(quantized, QuantizedWeight)
            forwards.attach_expert_weight(moe, name, quantized)
    return moe.to(device)


def hf_block(shapes: Shapes, source: MoE, device: torch.device) -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=shapes.dim, intermediate_size=shapes.inter,
        num_local_experts=shapes.experts, num_experts_per_tok=shapes.top_k,
    )  # fmt: skip
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(config)
    block = block.to_empty(device=device).to(torch.bfloat16).eval()
    with torch.no_grad():
        block.gate.weight.copy_(source.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat((source.w1, source.w3), dim=1))
        block.experts.down_proj.copy_(source.w2)
    return block


def expert_bytes(moe: MoE) -> int:
    """Bytes of one expert's three matrices (codes + scales)."""
    total = 0
    for weight in forwards.expert_weights(moe):
        if isinstance(weight, torch.Tensor):
            total += weight.numel() * weight.element_size()
        else:  # packed codes + scales
            total += weight.nbytes
    return total // int(moe.n_experts)


def time_three(
    moe: MoE, hf: torch.nn.Module | None, x: torch.Tensor
) -> tuple[float, float, float | None]:
    """ms of the fused forward, the torch backend's forward and (bf16) the transformers block."""

    def fused() -> torch.Tensor:
        return forwards.moe_triton(moe, x)

    def torch_backend() -> torch.Tensor:
        if forwards.is_quantized(moe):
            return forwards.moe_torch_quantized(moe, x)
        return MoE.forward(moe, x)

    def transformers_block() -> torch.Tensor:
        assert hf is not None
        return hf(x)

    hf_ms = timed(transformers_block) if hf is not None else None
    return timed(fused), timed(torch_backend), hf_ms


def graph_ms(moe: MoE, x: torch.Tensor) -> float | None:
    """ms of the fused layer replayed from a CUDA graph (None off CUDA or past decode sizes)."""
    if not torch.cuda.is_available() or x.shape[1] > GRAPH_MAX_TOKENS:
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and settle allocations before capture
            forwards.moe_triton(moe, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forwards.moe_triton(moe, x)
    return timed(graph.replay)


def bench_moe(shapes: Shapes, device: torch.device) -> list[MoERow]:
    torch.manual_seed(0)
    with torch.device(device):
        source = MoE(
            ModelConfig(
                dim=shapes.dim, n_heads=1, n_kv_heads=1, head_dim=2,
                intermediate=shapes.inter, n_experts=shapes.experts, top_k=shapes.top_k,
            )
        )  # fmt: skip
    source = source.to(torch.bfloat16).requires_grad_(False)
    hf = hf_block(shapes, source, device)
    rows = []
    for fmt in FORMATS:
        moe = build_moe(shapes, fmt, device, source)
        per_expert = expert_bytes(moe)
        for n_tokens in shapes.tokens:
            x = torch.randn(1, n_tokens, shapes.dim, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                fused, baseline, hf_ms = time_three(moe, hf if fmt == "bf16" else None, x)
                replayed = graph_ms(moe, x)
                _, ids = moe.route(x[0])
            hit = int(torch.unique(ids).numel())
            activations = (
                2 * n_tokens * shapes.dim * 2
                + 2 * n_tokens * shapes.top_k * (shapes.inter + shapes.dim) * 2
            )  # x in, out, intermediate written and read (bf16)
            moved = hit * per_expert + activations
            row = MoERow(fmt, n_tokens, fused, baseline, hf_ms, moved, replayed)
            rows.append(row)
            print(
                f"moe {fmt:5} M={n_tokens:5}: fused {fused:8.3f} ms"
                + (f" (graph {replayed:8.3f} ms)" if replayed is not None else "")
                + f", torch {baseline:8.3f} ms"
                + (f", hf {hf_ms:8.3f} ms" if hf_ms is not None else "")
                + f", {row.bandwidth() / 1e9:7.1f} GB/s",
                flush=True,
            )
        del moe
    return rows


def moe_table(rows: list[MoERow], device: Device) -> str:
    peak = device.peak_bandwidth
    lines = [
        "| format | tokens | fused ms | graph ms | GB/s | % of peak BW | torch ms | x torch "
        "| HF ms | x HF |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = f"{100 * r.bandwidth() / peak:.0f}%" if peak else "n/a"
        hf = f"{r.hf_ms:.3f}" if r.hf_ms is not None else "-"
        vs_hf = f"{r.hf_ms / r.fused_ms:.1f}" if r.hf_ms is not None else "-"
        graph = f"{r.graph_ms:.3f}" if r.graph_ms is not None else "-"
        lines.append(
            f"| {r.fmt} | {r.tokens} | {r.fused_ms:.3f} | {graph} | {r.bandwidth() / 1e9:.0f} | "
            f"{share} | {r.torch_ms:.3f} | {r.torch_ms / r.fused_ms:.1f} | {hf} | {vs_hf} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny shapes")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--no-layer", action="store_true", help="the MoE layer only")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of moe_kernels.json")
    parser.add_argument("--tokens", default=None, help="comma-separated M (default: all)")
    parser.add_argument("--budget-ms", type=float, default=2000.0, help="per measurement")
    parser.add_argument(
        "--configs",
        type=Path,
        default=None,
        help="also read MoE launch configs from this folder (tuned elsewhere)",
    )
    args = parser.parse_args()
    device = detect_device()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print(
            "bench/moe_kernels.py: no CUDA device. The MoE and decoder-layer figures are GPU "
            "figures (8x22B shapes need ~15 GB of GPU memory); nothing measured, "
            "docs/benchmarks.md left as it is. Run on an H100/H200, or pass --tiny for a CPU "
            "smoke run at tiny shapes (labelled as such).",
            file=sys.stderr,
        )
        return 0
    shapes = TINY if args.tiny else REAL
    if args.tokens:
        shapes = dataclasses.replace(shapes, tokens=tuple(int(m) for m in args.tokens.split(",")))
    QUICK["on"] = args.tiny
    torch_device = torch.device("cuda" if cuda else "cpu")
    TIME_BUDGET_MS["each"] = args.budget_ms
    with config_dirs(*([args.configs] if args.configs else [])):
        moe_rows = bench_moe(shapes, torch_device)
    layer_rows: list[LayerResult] = (
        [] if args.no_layer else [bench_decoder_layer(f, torch_device, args.tiny) for f in FORMATS]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_kernels.json").write_text(
        json.dumps({"device": device.label(), "peak_bandwidth": device.peak_bandwidth,
                    "moe": [{**r.__dict__, "bandwidth": r.bandwidth(),
                             "share_of_peak": r.bandwidth() / device.peak_bandwidth
                             if device.peak_bandwidth else None} for r in moe_rows],
                    "layer": [r.__dict__ for r in layer_rows]}, indent=1)
    )  # fmt: skip
    print(f"wrote {args.out / 'moe_kernels.json'}")
    note = (
        f"**CPU smoke run at tiny shapes** (dim {shapes.dim}, inter {shapes.inter}, the `small` "
        "preset's decoder "
        "layer; triton through its interpreter; one call each, no warm-up): these "
        "timings say nothing about GPUs, they only show the script runs end to end. **The "
        "8x22B GPU figures are owed**: run `make bench-kernels` on an H100 / H200."
        if args.tiny
        else f"8x22B shapes (hidden {shapes.dim}, intermediate {shapes.inter}, "
        f"{shapes.experts} experts, top-{shapes.top_k}), bf16 activations."
    )
    copy = f"; measured copy bandwidth {device.copy_bandwidth / 1e12:.2f} TB/s" if (
        device.copy_bandwidth) else ""  # fmt: skip
    body = "\n".join([
        "### MoE layer and decoder layer (`make bench-kernels`)",
        "",
        f"Device: {device.label()}{copy}. {note}",
        "",
        "MoE layer, routing included. `fused` is the Triton path (int8/int4: the packed "
        "kernels with the launch of local_backend/kernels/configs/ for this device, else the "
        "heuristic); `graph` the same replayed from a CUDA graph (M <= 64, as the engine "
        "decodes). `torch` is the torch backend (the model's expert loop for bf16, dequantize "
        "each hit expert then matmul for int8/int4); `HF` is transformers' "
        "MixtralSparseMoeBlock (bf16 only). Bandwidth: bytes of the experts actually hit "
        "(codes + scales) plus activations, over the better of fused and graph.",
        "",
        moe_table(moe_rows, device),
        "",
        layer_table(layer_rows, device) if layer_rows else "(decoder layer not run)",
    ])  # fmt: skip
    if not args.no_doc:
        write_section("moe", body)
        print("wrote docs/benchmarks.md (kernels: moe)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
