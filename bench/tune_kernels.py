"""Sweep the launch configs of the dense int8/int4 GEMV/GEMM and of decode attention, and write
the fastest correct one per shape bucket as JSON the kernels read (kernels/launch_configs.py).

    python bench/tune_kernels.py                  # CUDA, 8x22B shapes -> kernels/configs/
    python bench/tune_kernels.py --tiny --out D   # CPU interpreter, tiny shapes (a smoke run)

Dense: the fused q/k/v projection (8192 x 6144, decode), wq/wo (6144 x 6144), wk/wv (1024 x
6144) and the output head (32000 x 6144), int4 and int8, at M = 1 ... 32 rows (decode) and
64 ... 4096 (prefill), decode rows first (so a spent budget drops prefill buckets); each
candidate is checked against the torch reference before it may win, and "dequant" (cuBLAS on
the dequantized matrix) competes at M >= 64. Attention: GQA 48/8, head dim 128, batch 1/8/32 x
cache length 1k ... 64k, over split counts, key block sizes, warps and stages. `--budget-s`
stops a sweep early and keeps what was measured (the kernels fall back to their heuristics for
the rest). The summary (best vs heuristic per bucket) goes to --summary as JSON.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from kernels_common import QUICK, detect_device, time_ms  # noqa: E402

from local_backend.kernels import decode_attention as attn  # noqa: E402
from local_backend.kernels import dense_quant as dq  # noqa: E402
from local_backend.kernels import launch_configs, reference  # noqa: E402
from local_backend.kernels.quant import quantize_int4, quantize_int8  # noqa: E402
from local_backend.kernels.runtime import cdiv, next_power_of_2, sm_count  # noqa: E402

# (N, K): fused wq|wk|wv (decode), wq / wo, wk / wv (prefill), the output head
REAL_DENSE = [(8192, 6144), (6144, 6144), (1024, 6144), (32000, 6144)]
REAL_ROWS = (1, 2, 4, 8, 16, 32, 64, 512, 4096)
REAL_ATTENTION = (48, 8, 128)  # H, Hkv, D
REAL_POINTS = [(b, c) for b in (1, 8, 32) for c in (1024, 4096, 16384, 65536)]
TINY_DENSE = [(48, 64)]
TINY_ROWS = (1, 32, 64)
TINY_ATTENTION = (6, 2, 32)
TINY_POINTS = [(1, 128), (2, 256)]


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    @property
    def spent(self) -> bool:
        return time.monotonic() > self.deadline


def sweep(
    run: Callable[..., torch.Tensor], candidates: Sequence[Any], expected: torch.Tensor
) -> list[tuple[float, Any]]:
    """(ms, config) of every candidate whose output matches `expected` (2% of its max)."""
    scale = float(expected.abs().max()) + 1e-6
    results: list[tuple[float, Any]] = []
    for config in candidates:
        try:
            error = float((run(config=config).float() - expected.float()).abs().max()) / scale
            if error > 2e-2:  # a wrong config never wins, however fast
                print(f"  reject {config}: relative error {error:.3g}")
                continue
            timed = functools.partial(run, config=config)
            results.append((time_ms(timed, warmup=3, reps=20, budget_ms=200), config))
        except Exception as exc:  # out of shared memory, registers...: not a candidate
            print(f"  skip {config}: {type(exc).__name__}: {str(exc)[:120]}")
    return results


def dense_candidates(
    weight: dq.DenseQuantWeight, m: int, device: torch.device, tiny: bool
) -> list[dq.DenseConfig]:
    """The heuristic first, then a small grid around what can win at this M."""
    group = weight.group_size if weight.format == "int4" else 0
    out = [dq.heuristic(weight, m, device)]
    if m <= 32:
        block_ms = [min(next_power_of_2(m), 8)] + ([16 if m <= 16 else 32] if m > 1 else [])
        block_ns = (16,) if tiny else (32, 64, 128)
        splits = (1, 2) if tiny else (1, 2, 4, 8, 16)
        block_ks = (group,) if group else ((32,) if tiny else (128, 256))
        programs_cap = 8 * sm_count(device)  # more programs than this only adds reductions
        for bm, bn, bk, sk in itertools.product(block_ms, block_ns, block_ks, splits):
            programs = cdiv(weight.out_features, bn) * cdiv(m, bm) * sk
            if sk > 1 and (programs > programs_cap or sk > cdiv(weight.in_features, bk)):
                continue
            tile_bytes = bn * (bk // 2 if group else bk)
            if tile_bytes > 16384:  # spills registers at any warp count (sm_90 builds)
                continue
            warps = 8 if bm == 32 or tile_bytes > 8192 else 4
            out.append(dq.DenseConfig(block_m=bm, block_n=bn, block_k=bk, split_k=sk,
                                      num_warps=warps, num_stages=3 if tiny else 4))  # fmt: skip
    else:
        tiles = [(64, 32)] if tiny else [(64, 64), (64, 128), (128, 64)]
        for bm, bn in tiles:
            out.append(dq.DenseConfig(block_m=bm, block_n=bn, block_k=group or 64,
                                      num_warps=4 if tiny else 8, num_stages=3))  # fmt: skip
        out.append(dq.DenseConfig(mode="dequant"))
    valid = []
    for config in out:
        try:
            dq.check_config(weight, config)
        except ValueError:
            continue
        if config not in valid:
            valid.append(config)
    return valid


def tune_dense(args: argparse.Namespace, device: torch.device, budget: Budget) -> dict:
    shapes = TINY_DENSE if args.tiny else REAL_DENSE
    rows = TINY_ROWS if args.tiny else REAL_ROWS
    dtype = torch.float32 if args.tiny else torch.bfloat16
    tuned: dict[str, dict[str, dict[str, Any]]] = {}
    summary: list[dict[str, Any]] = []
    weights = {}
    for fmt, (n, k) in itertools.product(args.formats.split(","), shapes):
        w = torch.randn(n, k, device=device) * 0.02
        q = quantize_int4(w, group_size=32 if args.tiny else None) if fmt == "int4" else (
            quantize_int8(w))  # fmt: skip
        weight = dq.DenseQuantWeight.from_quantized(q)
        weights[(fmt, n, k)] = (weight, weight.dequantize(torch.float32))
    # decode rows first (batch 1 is the headline): a spent budget drops prefill buckets first
    for m, ((_, n, k), (weight, dense)) in itertools.product(rows, weights.items()):
        key = dq.shape_key(weight)
        if budget.spent:
            return {"configs": tuned, "summary": summary, "stopped_early": True}
        x = torch.randn(m, k, device=device, dtype=dtype)
        expected = (x.float() @ dense.t()).to(dtype)
        candidates = dense_candidates(weight, m, device, args.tiny)
        results = sweep(functools.partial(dq.dense_linear, x, weight), candidates, expected)
        if not results:
            continue
        best_ms, best = min(results, key=lambda r: r[0])
        heuristic_ms = results[0][0] if results[0][1] == dq.heuristic(weight, m, device) else None
        tuned.setdefault(key, {})[str(m)] = best.as_dict()
        args.save(dq.KERNEL, {key: {str(m): best.as_dict()}})  # kept if a timeout kills us
        bytes_read = weight.nbytes + x.nbytes + m * n * x.element_size()
        summary.append({"kernel": dq.KERNEL, "shape": key, "m": m, "best_ms": best_ms,
                        "heuristic_ms": heuristic_ms, "config": best.as_dict(),
                        "gb_per_s": bytes_read / best_ms / 1e6})  # fmt: skip
        print(f"{key} M={m}: {best_ms:.4f} ms ({bytes_read / best_ms / 1e6:.0f} GB/s) {best}")
    return {"configs": tuned, "summary": summary, "stopped_early": False}


def attention_candidates(batch: int, n_kv: int, length: int, device: torch.device, tiny: bool):
    base = attn.heuristic_config(batch, n_kv, length, device)
    out = [base]
    splits = (1, 2) if tiny else (8, 16, 32, 64, 128)
    blocks = (16,) if tiny else (64, 128)
    warps = (4,) if tiny else (8,)  # 4 warps spill registers at 64+ keys (sm_90 builds)
    stages = (3,) if tiny else (2, 3)
    for s, bn, w, st in itertools.product(splits, blocks, warps, stages):
        if s * bn > max(length, bn):  # more splits than key blocks: idle programs only
            continue
        config = attn.AttentionConfig(num_splits=s, block_n=bn, num_warps=w, num_stages=st)
        if config not in out:
            out.append(config)
    return out


def tune_attention(args: argparse.Namespace, device: torch.device, budget: Budget) -> dict:
    n_heads, n_kv, head_dim = TINY_ATTENTION if args.tiny else REAL_ATTENTION
    points = TINY_POINTS if args.tiny else REAL_POINTS
    dtype = torch.float32 if args.tiny else torch.bfloat16
    key = attn.shape_key(n_heads, n_kv, head_dim)
    tuned: dict[str, dict[str, dict[str, Any]]] = {}
    summary: list[dict[str, Any]] = []
    for batch, length in points:
        if budget.spent:
            return {"configs": tuned, "summary": summary, "stopped_early": True}
        k_cache = torch.randn(batch, length, n_kv, head_dim, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(batch, n_heads, head_dim, device=device, dtype=dtype)
        slots = torch.arange(batch, device=device)
        lengths = torch.full((batch,), length, device=device)
        expected = reference.decode_attention(q, k_cache, v_cache, slots, lengths).float()
        run = functools.partial(attn.decode_attention, q, k_cache, v_cache, slots, lengths)
        results = sweep(run, attention_candidates(batch, n_kv, length, device, args.tiny), expected)
        if not results:
            continue
        best_ms, best = min(results, key=lambda r: r[0])
        kv_bytes = 2 * k_cache.nbytes
        bucket = launch_configs.bucket_name(batch, length)
        tuned.setdefault(key, {})[bucket] = best.as_dict()
        args.save(attn.KERNEL, {key: {bucket: best.as_dict()}})  # kept if a timeout kills us
        rate = kv_bytes / best_ms / 1e6
        summary.append({"kernel": attn.KERNEL, "shape": key, "batch": batch, "length": length,
                        "best_ms": best_ms, "heuristic_ms": results[0][0],
                        "config": best.as_dict(), "gb_per_s": rate})  # fmt: skip
        print(f"{key} batch {batch} length {length}: {best_ms:.4f} ms "
              f"(heuristic {results[0][0]:.4f}; KV {rate:.0f} GB/s) {best}")  # fmt: skip
    return {"configs": tuned, "summary": summary, "stopped_early": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU interpreter, tiny shapes")
    parser.add_argument("--out", type=Path, default=None, help="configs directory to write")
    parser.add_argument("--kernels", default="dense,attention")
    parser.add_argument("--formats", default="int4,int8")
    parser.add_argument("--budget-s", type=float, default=150.0, help="per kernel")
    parser.add_argument("--summary", type=Path, default=None, help="JSON of the sweep")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no CUDA device: tuning figures mean nothing off a GPU (use --tiny for a smoke run)")
        return 2
    device = torch.device("cuda" if cuda and not args.tiny else "cpu")
    QUICK["on"] = args.tiny
    out_dir = args.out or (
        launch_configs.CONFIG_DIR if not args.tiny else Path("bench/out/configs")
    )
    name = detect_device().name if device.type == "cuda" else "cpu"
    key = launch_configs.device_key(device)
    report: dict[str, Any] = {"device": name, "device_key": key, "kernels": {}}
    sweeps = {"dense": (dq.KERNEL, tune_dense), "attention": (attn.KERNEL, tune_attention)}
    for wanted in args.kernels.split(","):
        kernel, run_sweep = sweeps[wanted]
        torch.manual_seed(0)

        def save(kernel: str, configs: dict, name: str = name, key: str = key) -> None:
            launch_configs.write_configs(kernel, name, key, configs, out_dir)

        args.save = save
        result = run_sweep(args, device, Budget(args.budget_s))
        path = launch_configs.write_configs(kernel, name, key, result["configs"], out_dir)
        print(
            f"wrote {path}" + (" (budget spent: partial sweep)" if result["stopped_early"] else "")
        )
        report["kernels"][kernel] = {"path": str(path), **result}
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
