"""Prefill and decode tokens/s of our local backend vs transformers, on the same weights.

    .venv/bin/python bench/local_decode.py                     # CPU, the `small` preset sizes
    .venv/bin/python bench/local_decode.py --device cuda --dtype bfloat16 --dim 1024

One run builds a random-weight MixtralForCausalLM (transformers), saves it, loads the same
folder with our loader, and times, side by side:

- prefill: one forward of B prompts of P tokens (only the last position's logits, both sides);
- decode: N greedy steps of B sequences (T = 1, with a KV cache);
- ours (engine): the whole Engine (scheduler, sampling, text streaming, asyncio hand-off) on B
  greedy requests, prefill included, counting completion tokens over wall time.

Each figure is the median of --repeats timed runs after one warm-up. The result is written
to docs/benchmarks.md between the local_decode markers (the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from doc_section import write_section  # noqa: E402  (bench/ is the script's path)

from local_backend.engine import Engine  # noqa: E402
from local_backend.generation import GenerationRequest  # noqa: E402
from local_backend.kv_cache import KVCache  # noqa: E402
from local_backend.model import Transformer  # noqa: E402
from local_backend.sampling import SamplingParams  # noqa: E402
from local_backend.tokenizer import Tokenizer  # noqa: E402

BENCH_DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- local_decode:start -->", "<!-- local_decode:end -->"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                  if ln.startswith("model name")]  # fmt: skip
        name = f"{models[0]} x{len(models)}" if models else name
    return f"CPU ({name}; torch threads {torch.get_num_threads()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds of a timed region, with the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        sync(self.device)
        start = time.perf_counter()
        fn()
        sync(self.device)
        return time.perf_counter() - start


def interleaved_medians(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each run's own timing; one warm-up each, then the runs take turns, so a
    change of load on a shared machine hits every contender alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(values) for name, values in times.items()}


def build_models(args: argparse.Namespace, folder: Path) -> tuple[Any, Transformer]:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    hf_config = MixtralConfig(
        vocab_size=32000,
        hidden_size=args.dim,
        intermediate_size=args.dim * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=8192,
    )
    MixtralForCausalLM(hf_config).save_pretrained(folder)
    dtype = DTYPES[args.dtype]
    hf = MixtralForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    ours = Transformer.from_model_dir(folder, device=args.device, dtype=dtype, progress=False)
    return hf, ours


def ours_runs(model: Transformer, prompts: torch.Tensor, steps: int) -> dict:
    """Timed prefill and decode of our model, driven directly (no engine)."""
    device = prompts.device
    clock = Clock(device)
    batch, length = prompts.shape
    cache = KVCache(model.config, batch, length + steps + 1, device, next(model.parameters()).dtype)
    slots = torch.arange(batch, device=device)
    positions = torch.arange(length, device=device).expand(batch, length)  # [B, P]

    def prefill() -> torch.Tensor:
        return model(prompts, positions, cache, slots, last_token_only=True)  # [B, 1, V]

    def decode() -> float:
        token = prefill()[:, -1].argmax(-1, keepdim=True)  # [B, 1]

        def steps_only() -> None:
            nonlocal token
            for step in range(steps):
                pos = torch.full((batch, 1), length + step, device=device)  # [B, 1]
                token = model(token, pos, cache, slots)[:, -1].argmax(-1, keepdim=True)

        return clock(steps_only)

    return {"prefill ours": lambda: clock(prefill), "decode ours": decode}


def hf_runs(model: Any, prompts: torch.Tensor, steps: int) -> dict:
    """Timed prefill and decode of transformers' model (DynamicCache, greedy)."""
    from transformers import DynamicCache

    clock = Clock(prompts.device)

    def prefill() -> Any:
        return model(prompts, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

    def decode() -> float:
        out = prefill()
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def steps_only() -> None:
            nonlocal token
            for _ in range(steps):
                logits = model(token, past_key_values=cache, use_cache=True).logits
                token = logits[:, -1].argmax(-1, keepdim=True)

        return clock(steps_only)

    return {"prefill HF": lambda: clock(prefill), "decode HF": decode}


def engine_run(engine: Engine, prompts: torch.Tensor, steps: int) -> Callable[[], float]:
    """The whole engine on B greedy requests (prefill included): seconds for all of them."""
    rows = prompts.tolist()

    async def run_all() -> None:
        params = SamplingParams(temperature=0.0)
        requests = [GenerationRequest(r, steps, params, ignore_eos=True) for r in rows]
        await asyncio.gather(*(engine.generate(r) for r in requests))

    clock = Clock(prompts.device)
    return lambda: clock(lambda: asyncio.run(run_all()))


def render(args: argparse.Namespace, device: torch.device, rows: list[tuple]) -> str:
    lines = [
        START,
        "## Local backend: prefill and decode (bench/local_decode.py)",
        "",
        f"Device: {device_name(device)}, load average {os.getloadavg()[0]:.1f} when run; "
        f"torch {torch.__version__}; dtype {args.dtype}; "
        f"random weights, dim {args.dim}, {args.layers} layers, 8 experts top-2, vocab 32000; "
        f"prompt {args.prompt_len} tokens, {args.steps} decode steps; median of {args.repeats}.",
        "",
        "| batch | prefill tok/s ours | prefill tok/s HF | ratio | decode tok/s ours "
        "| decode tok/s HF | ratio | engine end-to-end tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, p_ours, p_hf, d_ours, d_hf, engine in rows:
        lines.append(
            f"| {batch} | {p_ours:,.0f} | {p_hf:,.0f} | {p_ours / p_hf:.2f}x | {d_ours:,.1f} "
            f"| {d_hf:,.1f} | {d_ours / d_hf:.2f}x | {engine:,.1f} |"
        )
    lines += [
        "",
        "Ours = local_backend.model.Transformer with the static KVCache (reference PyTorch "
        "path, no custom kernels); HF = transformers' MixtralForCausalLM with DynamicCache, "
        "same weights and dtype. Engine end-to-end includes prefill, sampling and streaming.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.threads:
        # On a shared, busy CPU, OpenMP barriers across threads stall for whole scheduler
        # time slices; one thread gives steadier figures (both sides run the same way).
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device: {device_name(device)}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_models(args, Path(tmp))
        tokenizer = Tokenizer.from_mistral_common("v1")
        for batch in (int(b) for b in args.batches.split(",")):
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, 32000, (batch, args.prompt_len), generator=g).to(device)
            engine = Engine(
                ours, tokenizer, ours.config, max_slots=batch,
                max_seq_len=args.prompt_len + args.steps + 1, queue_size=batch,
            ).start()  # fmt: skip
            runs = {**ours_runs(ours, prompts, args.steps), **hf_runs(hf, prompts, args.steps)}
            runs["engine"] = engine_run(engine, prompts, args.steps)
            with torch.inference_mode():
                t = interleaved_medians(runs, args.repeats)
            engine.stop()
            prefill_tokens, decode_tokens = batch * args.prompt_len, batch * args.steps
            row = (
                batch, prefill_tokens / t["prefill ours"], prefill_tokens / t["prefill HF"],
                decode_tokens / t["decode ours"], decode_tokens / t["decode HF"],
                decode_tokens / t["engine"],
            )  # fmt: skip
            print(
                f"batch {batch}: prefill ours {row[1]:,.0f} HF {row[2]:,.0f} tok/s; decode ours "
                f"{row[3]:,.1f} HF {row[4]:,.1f} tok/s; engine {row[5]:,.1f} tok/s"
            )
            rows.append(row)
    section = render(args, device, rows)
    if not args.no_write:
        write_section(section, START, END)
        print(f"wrote {BENCH_DOC.relative_to(ROOT)}")
    print(section)


if __name__ == "__main__":
    main()
