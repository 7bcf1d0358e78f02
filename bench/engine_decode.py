"""The whole Engine at the 8x22B's layer shapes: decode step time fitted as fixed + per-layer
and extrapolated to 56 layers, against the bandwidth bound; prefill and time to first token.

    python bench/engine_decode.py                 # CUDA: real shapes, 2 and 6 layers
    python bench/engine_decode.py --tiny          # CPU smoke run at tiny shapes (prints only)

For each format (bf16 / int8 / int4, quantized by quantize_model as the loader would) one
random-weight model of 6 layers is built; the 2-layer model shares its first 2 layers. Each
runs in an Engine (scheduler, sampling, detokenizing, asyncio hand-off, CUDA graphs: what a
request meets), greedy, with `--prompt`-token prompts:

- decode: the median interval between a row's tokens at batch 1 / 8 / 16 / 32, for 2 and 6
  layers -> per-layer = (t6 - t2) / 4, fixed = t2 - 2 per-layer, step(56) = fixed + 56
  per-layer, tokens/s = batch / step(56). Bound (batch 1) = HBM bandwidth (kernels_common's
  table of devices) / active weight bytes per token (memory_plan); share = tokens/s / bound.
- device step: the decode graph replayed alone (CUDA events), so host work per step = engine
  step - device step (its share at 56 layers is what must stay under 5%).
- prefill: one request of 512 and of 4096 tokens, max_tokens 1 (time to first token at batch
  1), fitted and extrapolated alike; FLOP/s as a share of the device's bf16 tensor-core peak.
- host: engine_host.py's stub-model figure (host work alone, any device).

Writes the engine_decode section of docs/benchmarks.md (device named) and --json.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from doc_section import write_section  # noqa: E402
from engine_host import host_us_per_step  # noqa: E402
from kernels_common import QUICK, Device, detect_device, time_ms  # noqa: E402

from local_backend import memory_plan  # noqa: E402
from local_backend.config import ModelConfig  # noqa: E402
from local_backend.engine import Engine  # noqa: E402
from local_backend.generation import GenerationRequest  # noqa: E402
from local_backend.kernels import select_backend  # noqa: E402
from local_backend.model import Transformer  # noqa: E402
from local_backend.quantize import quantize_model  # noqa: E402
from local_backend.sampling import SamplingParams  # noqa: E402
from local_backend.tokenizer import Tokenizer  # noqa: E402

START, END = "<!-- engine_decode:start -->", "<!-- engine_decode:end -->"
GREEDY = SamplingParams(temperature=0.0)


@dataclasses.dataclass
class Fit:
    """t(L) = fixed + L * per_layer from two layer counts."""

    fixed: float
    per_layer: float

    @classmethod
    def of(cls, points: dict[int, float]) -> Fit:
        (l1, t1), (l2, t2) = sorted(points.items())
        per_layer = (t2 - t1) / (l2 - l1)
        return cls(t1 - l1 * per_layer, per_layer)

    def at(self, layers: int) -> float:
        return self.fixed + layers * self.per_layer


def build_model(
    config: ModelConfig, fmt: str, device: torch.device, dtype: torch.dtype, backend: str,
    quantize_head: bool,
) -> Transformer:  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters born in dtype: an fp32 detour doubles memory
    try:
        model = Transformer.from_config(config, device=device, dtype=dtype)
    finally:
        torch.set_default_dtype(default)
    quantize_model(model, fmt, backend=backend, quantize_head=quantize_head)
    return model


def first_layers(model: Transformer, n_layers: int) -> Transformer:
    """A model of the first `n_layers` layers of `model`, sharing every weight."""
    sub = copy.copy(model)
    sub._modules = dict(model._modules)
    sub._modules["layers"] = nn.ModuleList(list(model.layers)[:n_layers])
    sub.config = dataclasses.replace(model.config, n_layers=n_layers)
    return sub


def active_bytes(config: ModelConfig, fmt: str, quantize_head: bool) -> int:
    total = memory_plan.active_weight_bytes(config, fmt)
    if quantize_head and fmt != "bf16":
        head = memory_plan.get_format(fmt).matrix_bytes(config.vocab_size, config.dim)
        total -= config.vocab_size * config.dim * 2 - head
    return total


def prefill_flops(config: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of one causal prefill of `tokens` tokens (logits of the last one only)."""
    d, q, kv = config.dim, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    projections = 2 * tokens * (2 * d * q + 2 * d * kv)
    experts = 2 * tokens * config.top_k * 3 * d * config.intermediate
    router = 2 * tokens * d * config.n_experts
    attention = 4 * config.n_heads * config.head_dim * tokens * (tokens + 1) / 2
    per_layer = projections + experts + router + attention
    return config.n_layers * per_layer + 2 * d * config.vocab_size


async def decode_interval(engine: Engine, batch: int, prompt: int, steps: int) -> float:
    """Median seconds between consecutive tokens of row 0 while `batch` rows decode."""
    generator = torch.Generator().manual_seed(batch)
    vocab = engine.config.vocab_size
    arrivals: list[float] = []

    async def consume(tokens: list[int], record: bool) -> None:
        async with engine.submit(GenerationRequest(tokens, steps, GREEDY, ignore_eos=True)) as s:
            async for _ in s:
                if record:
                    arrivals.append(time.perf_counter())

    prompts = torch.randint(3, vocab, (batch, prompt), generator=generator).tolist()
    await asyncio.gather(*(consume(p, i == 0) for i, p in enumerate(prompts)))
    return statistics.median(b - a for a, b in itertools.pairwise(arrivals[1:]))  # [0]: prefill


async def time_to_first_token(engine: Engine, prompt: int) -> float:
    tokens = torch.randint(3, engine.config.vocab_size, (prompt,)).tolist()
    start = time.perf_counter()
    async with engine.submit(GenerationRequest(tokens, 1, GREEDY, ignore_eos=True)) as stream:
        async for _ in stream:
            return time.perf_counter() - start
    raise RuntimeError("no token came back")


def device_step_ms(engine: Engine, batch: int, position: int) -> float | None:
    """The decode graph of `batch` replayed alone (CUDA only): the device's share of a step."""
    runner = engine._scheduler.decode_runner  # the bench reads the engine's own graphs
    if batch not in runner.captured_buckets:
        return None
    staging = runner._staging_for(batch)
    staging[0], staging[1], staging[2] = 5, position, torch.arange(batch)
    step = runner._step_for(batch)
    return time_ms(lambda: step(staging))


def run_format(args: argparse.Namespace, fmt: str, device: torch.device) -> dict[str, Any]:
    layer_counts = sorted(int(n) for n in args.layers.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    prefills = [int(p) for p in args.prefill.split(",")]
    base = ModelConfig.from_name(args.model)
    config = dataclasses.replace(base, n_layers=max(layer_counts))
    dtype = torch.float32 if args.tiny else torch.bfloat16
    backend = select_backend(device, args.backend)
    model = build_model(config, fmt, device, dtype, backend, args.quantize_head)
    tokenizer = Tokenizer.from_mistral_common("v1")
    decode: dict[int, dict[int, float]] = {b: {} for b in batches}
    device_ms: dict[int, dict[int, float]] = {b: {} for b in batches}
    ttft: dict[int, dict[int, float]] = {p: {} for p in prefills}
    for n_layers in layer_counts:
        sub = first_layers(model, n_layers)
        longest = max([*prefills, args.prompt + args.steps]) + 8
        engine = Engine(sub, tokenizer, sub.config, max_slots=max(batches), max_seq_len=longest,
                        queue_size=max(batches), prefill_chunk=max(prefills),
                        prefill_token_budget=max(max(prefills), max(batches) * args.prompt),
                        ).start()  # fmt: skip
        try:
            with torch.inference_mode():
                for batch in batches:
                    asyncio.run(decode_interval(engine, batch, args.prompt, 3))  # warm-up
                    runs = [asyncio.run(decode_interval(engine, batch, args.prompt, args.steps))
                            for _ in range(args.repeats)]  # fmt: skip
                    decode[batch][n_layers] = min(runs) * 1e3
                    replay = device_step_ms(engine, batch, args.prompt + args.steps)
                    if replay is not None:
                        device_ms[batch][n_layers] = replay
                    step_ms = decode[batch][n_layers]
                    print(f"{fmt} {n_layers} layers batch {batch}: step {step_ms:.3f} ms "
                          f"(device {replay or 0:.3f} ms)")  # fmt: skip
                for prompt in prefills:
                    asyncio.run(time_to_first_token(engine, prompt))  # warm-up
                    runs = [asyncio.run(time_to_first_token(engine, prompt))
                            for _ in range(args.repeats)]  # fmt: skip
                    ttft[prompt][n_layers] = min(runs) * 1e3
                    print(f"{fmt} {n_layers} layers prefill {prompt}: "
                          f"{ttft[prompt][n_layers]:.2f} ms")  # fmt: skip
        finally:
            engine.stop()
    del model
    return {"format": fmt, "decode_ms": decode, "device_ms": device_ms, "ttft_ms": ttft}


def summarize(args: argparse.Namespace, results: list[dict[str, Any]], dev: Device) -> dict:
    full = ModelConfig.from_name(args.model)
    target = ModelConfig.from_name("wizardlm-2-8x22b").n_layers  # 56, tiny runs included
    rows, prefill_rows = [], []
    for result in results:
        fmt = result["format"]
        weights = active_bytes(full, fmt, args.quantize_head)
        bound = dev.peak_bandwidth / weights if dev.peak_bandwidth else None
        for batch, points in result["decode_ms"].items():
            fit = Fit.of(points)
            step = fit.at(target)
            device_points = result["device_ms"].get(batch) or {}
            device_step = Fit.of(device_points).at(target) if len(device_points) == 2 else None
            tps = batch * 1e3 / step
            rows.append({"format": fmt, "batch": batch, "points_ms": points,
                         "fixed_ms": fit.fixed, "per_layer_ms": fit.per_layer,
                         "step_ms_56": step, "tokens_per_s": tps,
                         "bound_tokens_per_s": bound if batch == 1 else None,
                         "share_of_bound": tps / bound if bound and batch == 1 else None,
                         "device_step_ms_56": device_step,
                         "host_share": 1 - device_step / step if device_step else None,
                         })  # fmt: skip
        for prompt, points in result["ttft_ms"].items():
            ms = Fit.of(points).at(target)
            flops = prefill_flops(full, prompt) / (ms / 1e3)
            prefill_rows.append({"format": fmt, "tokens": prompt, "points_ms": points,
                                 "ttft_ms_56": ms, "tokens_per_s": prompt * 1e3 / ms,
                                 "tflops": flops / 1e12,
                                 "share_of_peak": flops / dev.peak_flops if dev.peak_flops
                                 else None})  # fmt: skip
    return {"model": full.name, "layers": target, "decode": rows, "prefill": prefill_rows}


def pct(x: float | None) -> str:
    return f"{100 * x:.0f}%" if x is not None else "n/a"


def render(args: argparse.Namespace, dev: Device, summary: dict, host: dict[int, Any]) -> str:
    lines = [START, "## Engine end to end at 8x22B layer shapes (bench/engine_decode.py)", "",
             f"Device: **{dev.label()}**{' - TINY SHAPES, CPU smoke run' if args.tiny else ''}; "
             f"torch {torch.__version__}; model {summary['model']} shapes, random weights, "
             f"layers {args.layers} fitted as fixed + per-layer and extrapolated to "
             f"{summary['layers']}; greedy, {args.prompt}-token prompts; best of "
             f"{args.repeats}. Bound = HBM bandwidth / active weight bytes per token "
             "(memory_plan); host share = 1 - graph replay / engine step.", "",
             "| format | batch | step ms (per layer count) | fixed ms | per-layer ms "
             "| tok/s at 56 | bound tok/s | share | host share |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in summary["decode"]:
        points = " / ".join(f"{ms:.3f}" for _, ms in sorted(r["points_ms"].items()))
        bound = f"{r['bound_tokens_per_s']:.0f}" if r["bound_tokens_per_s"] else "-"
        lines.append(f"| {r['format']} | {r['batch']} | {points} | {r['fixed_ms']:.3f} | "
                     f"{r['per_layer_ms']:.3f} | {r['tokens_per_s']:.1f} | {bound} | "
                     f"{pct(r['share_of_bound'])} | {pct(r['host_share'])} |")  # fmt: skip
    ratios = []
    for fmt in dict.fromkeys(r["format"] for r in summary["decode"]):
        by_batch = {r["batch"]: r["tokens_per_s"] for r in summary["decode"] if r["format"] == fmt}
        if 1 in by_batch and 16 in by_batch:
            ratios.append(f"{fmt} {by_batch[16] / by_batch[1]:.1f}x")
    if ratios:
        lines += ["", "Aggregate tok/s at batch 16 over batch 1: " + ", ".join(ratios) + "."]
    lines += ["", "| format | prompt tokens | TTFT ms at 56 (batch 1) | prefill tok/s | TFLOP/s "
              "| share of bf16 peak |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in summary["prefill"]:
        lines.append(f"| {r['format']} | {r['tokens']} | {r['ttft_ms_56']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | "
                     f"{pct(r['share_of_peak'])} |")  # fmt: skip
    lines += ["", "Host work per step alone (engine_host.py, a stub model: sampling, "
              "detokenizing, hand-off): " + ", ".join(
                  f"batch {b}: {wall:.0f} us period / {cpu:.0f} us engine-thread CPU"
                  for b, (wall, cpu) in host.items()), END]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes (smoke run)")
    parser.add_argument("--formats", default="int4,int8,bf16")
    parser.add_argument("--layers", default="2,6")
    parser.add_argument("--batches", default=None, help="default 1,8,16,32 (tiny: 1,4)")
    parser.add_argument("--prompt", type=int, default=None, help="default 64 (tiny: 16)")
    parser.add_argument("--steps", type=int, default=None, help="default 32 (tiny: 6)")
    parser.add_argument("--prefill", default=None, help="default 512,4096 (tiny: 32,64)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (tiny: 1)")
    parser.add_argument("--backend", default=None, help="kernels (default: by device)")
    parser.add_argument("--quantize-head", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true", help="print, leave the doc alone")
    parser.add_argument("--write", action="store_true", help="write the doc even with --tiny")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.model = "tiny" if tiny else "wizardlm-2-8x22b"
    args.batches = args.batches or ("1,4" if tiny else "1,8,16,32")
    args.prompt = args.prompt or (16 if tiny else 64)
    args.steps = args.steps or (6 if tiny else 32)
    args.prefill = args.prefill or ("32,64" if tiny else "512,4096")
    args.repeats = args.repeats or (1 if tiny else 3)
    if not torch.cuda.is_available() and not tiny:
        print("no CUDA device: use --tiny for a CPU smoke run")
        return 2
    device = torch.device("cpu" if tiny else "cuda")
    QUICK["on"] = tiny
    dev = (
        detect_device() if device.type == "cuda" else Device("CPU (tiny shapes)", None, None, None)
    )
    print(f"device: {dev.label()}")
    host = {b: host_us_per_step(b, steps=16 if tiny else 64, repeats=1 if tiny else 3)
            for b in ((1,) if tiny else (1, 8, 32))}  # fmt: skip
    results: list[dict[str, Any]] = []
    section = ""
    for fmt in args.formats.split(","):  # results are written after each format: a run cut
        results.append(run_format(args, fmt, device))  # short by a timeout keeps the rest
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        summary = summarize(args, results, dev)
        section = render(args, dev, summary, host)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            body = {"device": dev.name, "args": vars(args), "raw": results, **summary,
                    "host_us_per_step": host}  # fmt: skip
            args.json.write_text(json.dumps(body, indent=1, default=str) + "\n")
        # a tiny run proves the pipeline; its figures (CPU noise) must not replace a GPU table
        if not args.no_write and (args.write or not tiny):
            write_section(section, START, END)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
