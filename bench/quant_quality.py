"""Quantization quality: top-1 agreement and mean KL against bf16, int8 and int4.

Trains a byte-level Mixtral-architecture model (8 experts, top-2, GQA; dim 128 so int4 groups
are the real 128 inputs) on a license text an installed package ships, on CPU, then measures
each format's predictions on held-out windows of that text against the bf16 model; the same
for the random-weight model of that config. Writes docs/benchmarks.md (kernels: quality).
tests/kernels/test_quant_quality.py asserts thresholds on a shorter version of this run.

    python bench/quant_quality.py [--steps 400] [--no-doc]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from kernels_common import write_section

from local_backend.model import Transformer
from local_backend.quant_quality import (
    QualityReport,
    byte_config,
    evaluate_quantization,
    held_out_prompts,
    package_text,
    train_byte_model,
)

FORMATS = ("int8", "int4", "int8-experts", "int4-experts")


def table(title: str, reports: list[QualityReport]) -> str:
    lines = [f"{title}", "", "| format | top-1 agreement | mean KL (nats) |", "|---|---:|---:|"]
    lines += [r.row() for r in reports]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    source, text = package_text()
    config = byte_config(dim=128, n_layers=args.layers, intermediate=256)
    prompts = held_out_prompts(text, count=32, length=128)
    started = time.perf_counter()
    model, losses = train_byte_model(text, config, steps=args.steps, batch=16, seq_len=128)
    trained_s = time.perf_counter() - started
    final_loss = sum(losses[-20:]) / 20
    print(
        f"trained {args.steps} steps in {trained_s:.0f} s, loss {losses[0]:.2f} -> {final_loss:.2f}"
    )
    trained = evaluate_quantization(model, prompts, FORMATS)
    torch.manual_seed(0)
    random_model = Transformer.from_config(config)
    random = evaluate_quantization(random_model, prompts, FORMATS)
    for report in trained + random:
        print(report)
    body = "\n".join([
        "### Quantization quality (`python bench/quant_quality.py`)",
        "",
        f"CPU ({platform.machine()}), torch {torch.__version__}. Model: {config.name} "
        f"(Mixtral architecture: 8 experts top-2, 4:2 GQA heads, vocab = 256 bytes), trained "
        f"{args.steps} steps x 16 x 128 bytes on `{source}` (loss {losses[0]:.2f} -> "
        f"{final_loss:.2f} nats/byte, {trained_s:.0f} s). Prompts: 32 held-out windows of 128 "
        f"bytes = {prompts.numel()} positions. Reference: the same model in bf16; quantized "
        "copies are made from those bf16 weights, int8 per output channel, int4 in groups of "
        "128 with a clip search; `-experts` keeps attention in bf16. KL is KL(bf16 || "
        "quantized) per position. Measured on a small model: at 8x22B scale these are "
        "indicative, not a substitute for an eval of the real weights.",
        "",
        table("Trained model:", trained),
        "",
        table("Random weights (same config; near-tied logits make agreement the hard number):",
              random),
    ])  # fmt: skip
    if not args.no_doc:
        write_section("quality", body)
        print("wrote docs/benchmarks.md (kernels: quality)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
