"""Sweep the MoE layer's launch configs on this device and write them as data.

    python scripts/tune_moe.py                    # CUDA: 8x22B shapes, bf16 / int8 / int4
    python scripts/tune_moe.py --tiny --out-dir D # CPU interpreter smoke run (seconds)

For each format and M bucket (1, 2, 4, 8, 16, 32, 64, 512, 4096 tokens; top-2 of 8 experts)
the whole MoE layer (routing excluded: fixed random routing, the same for every candidate) is
timed per candidate launch and the fastest is written to
local_backend/kernels/configs/device=<name>,format=<fmt>,E=..,top_k=..,dim=..,inter=...json
(moe_configs.py reads it; nearest bucket wins). The winner of each bucket is checked against
the heuristic launch's output (relative Frobenius difference < 1e-2) before it is kept.

Search: coordinate descent, not the full product: the gate/up GEMM's tiles (and the strategy)
are swept with the heuristic's down GEMM, then the down GEMM's tiles and split-K with the best
gate/up; the heuristic is always measured first. Candidates per packed format: 6 decode
buckets x (1 + 3 gate/up + 5 down) = 54, M = 64: 1 + 8 + ~4 = 13, M = 512 and 4096: 8 each,
so 83; bf16: 9 x (1 + 3 + 3) + 3 (dense per-expert matmuls from 64 tokens) = 66; ~230 in
all. Each costs ~2 s on a GPU (a triton compile of ~1-2 s the first time its tiles are seen,
then 2 untimed and 3-20 timed calls capped at 0.25 s): ~460 s, more than a sweep may take.
So `--budget-s` (default 300; gpu_check_kernels.sh passes 240) is shared: each of the 27
(format, M) cells gets an equal share of the time left when it starts (~9-11 s: the
heuristic and its ~4-5 most promising neighbours; time a cell leaves unused passes on), and
later candidates are logged as skipped. Wall time: the budget, plus ~40 s to build and
quantize the weights of the three formats, plus at worst one candidate's overrun per cell
(~2 s, with the reference run and the winner's check): 300 + 40 + 27 x 2 ~= 400 s < 8 min.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from local_backend.kernels import reference  # noqa: E402
from local_backend.kernels.fused_moe import fused_experts  # noqa: E402
from local_backend.kernels.moe_configs import (  # noqa: E402
    CONFIG_DIR,
    MoELaunch,
    Strategy,
    config_file_name,
    default_launch,
    device_name,
    write_config,
)
from local_backend.kernels.packed import repack  # noqa: E402
from local_backend.kernels.quant import QuantizedWeight, quantize  # noqa: E402

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 512, 4096)
TINY_BUCKETS = (1, 8)
FORMATS = ("int4", "int8", "bf16")


@dataclasses.dataclass(frozen=True)
class Problem:
    n_experts: int = 8
    top_k: int = 2
    dim: int = 6144
    inter: int = 16384


REAL, TINY = Problem(), Problem(dim=128, inter=128)


def time_call(fn: Callable[[], object], quick: bool, cap_s: float = 0.25) -> float:
    """Median ms of fn(); `quick` (the interpreter): a single call."""
    cuda = torch.cuda.is_available()

    def once() -> float:
        if not cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)

    if quick:
        return once()
    fn()  # compile
    fn()
    samples: list[float] = []
    deadline = time.perf_counter() + cap_s
    while len(samples) < 20 and (len(samples) < 3 or time.perf_counter() < deadline):
        samples.append(once())
    return statistics.median(samples)


def gate_up_candidates(fmt: str, m: int, base: MoELaunch, tiny: bool) -> Iterator[MoELaunch]:
    """Variants of the gate/up tiles of `base` (its strategy and down GEMM kept)."""
    g = base.gate_up
    if base.strategy == "dequant":
        return
    if fmt == "bf16":
        tiles = [(g.block_m, 64, 64, 4), (g.block_m, 128, 64, 4), (g.block_m, 128, 64, 8)]
    elif base.strategy == "scan":  # (tiny: the last only, the interpreter's cost is per program)
        tiles = [
            (g.block_m, max(16, g.block_n // 2), 128, 4),
            (g.block_m, min(256, g.block_n * 2), 128, 4),
            (16, 64, 128, 4) if g.block_m != 16 else (16, 128, 128, 8),  # GEMV <-> tl.dot
        ]
    else:
        tiles = [(64, 128, 128, 4), (128, 128, 128, 8), (32, 64, 128, 4)]
    for block_m, block_n, block_k, warps in tiles[-1:] if tiny else tiles:
        gate_up = dataclasses.replace(
            g, block_m=block_m, block_n=block_n, block_k=block_k, num_warps=warps
        )
        yield dataclasses.replace(base, gate_up=gate_up)


def down_candidates(fmt: str, m: int, base: MoELaunch, tiny: bool) -> Iterator[MoELaunch]:
    d = base.down
    if base.strategy == "dequant":
        return
    if fmt == "bf16":
        tiles = [(64, 64, 1), (64, 128, 1), (32, 64, 4)]
    elif base.strategy == "scan":  # around the heuristic's N tile and split
        n0, s0 = d.block_n, d.split_k
        options = [(n0, max(1, s0 // 2)), (n0, min(16, 2 * s0)), (max(16, n0 // 2), s0),
                   (min(256, 2 * n0), s0), (n0, 1)]  # fmt: skip
        tiles = [(n, 128, split) for n, split in dict.fromkeys(options) if (n, split) != (n0, s0)]
    else:
        tiles = [(64, 128, 1), (128, 128, 1), (32, 128, 1)]
    for block_n, block_k, split in tiles[-1:] if tiny else tiles:
        down = dataclasses.replace(d, block_n=block_n, block_k=block_k, split_k=split)
        yield dataclasses.replace(base, down=down)


def build_weights(problem: Problem, fmt: str, device: torch.device) -> list[object]:
    torch.manual_seed(0)
    e, d, i = problem.n_experts, problem.dim, problem.inter
    weights: list[object] = []
    for shape in ((e, i, d), (e, i, d), (e, d, i)):
        w = torch.randn(shape, device=device, dtype=torch.bfloat16) * shape[-1] ** -0.5
        if fmt == "bf16":
            weights.append(w)
            continue
        q = quantize(w, fmt)
        assert isinstance(q, QuantizedWeight)
        del w
        weights.append(repack(q))
    return weights


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@dataclasses.dataclass
class Budget:
    """The sweep's time, shared fairly: each (format, M) cell gets an equal share of what is
    left when it starts (time a cell does not use passes to the later ones)."""

    end: float  # time.perf_counter() at which the whole sweep must stop
    cells_left: int

    def next_deadline(self) -> float:
        now = time.perf_counter()
        share = max(0.0, self.end - now) / max(1, self.cells_left)
        self.cells_left -= 1
        return now + share


@dataclasses.dataclass
class Sweep:
    """One format's sweep: the weights, where it runs, and the log of every measurement."""

    problem: Problem
    fmt: str
    device: torch.device
    tiny: bool
    budget: Budget
    log: list[dict[str, object]]
    weights: list[object] = dataclasses.field(default_factory=list)

    def runner(self, m: int) -> Callable[[MoELaunch], torch.Tensor]:
        """The layer at M = m tokens (fixed random input and routing) under a given launch."""
        p = self.problem
        dtype = torch.float32 if self.tiny else torch.bfloat16
        x = torch.randn(m, p.dim, device=self.device, dtype=dtype)
        logits = torch.randn(m, p.n_experts, device=self.device)
        topk_weights, ids = reference.route(logits, p.top_k)
        w1, w3, w2 = self.weights

        def run(launch: MoELaunch) -> torch.Tensor:
            return fused_experts(x, topk_weights, ids, w1, w3, w2,  # type: ignore[arg-type]
                                 launch=launch)  # fmt: skip

        return run

    def record(self, m: int, launch: MoELaunch, **result: object) -> None:
        self.log.append({"format": self.fmt, "m": m, "launch": launch.to_json(), **result})

    def bucket(self, m: int) -> tuple[MoELaunch, float]:
        """The fastest launch found for M = m, and its time in ms."""
        p, fmt, tiny = self.problem, self.fmt, self.tiny
        deadline = self.budget.next_deadline()
        run = self.runner(m)
        base = default_launch(self.device, fmt, p.n_experts, p.top_k, p.dim, p.inter, m)
        begin = time.perf_counter()
        expected = run(base)  # the reference output; the interpreter's timing too (one call)
        best, best_ms = base, (time.perf_counter() - begin) * 1e3
        if not tiny:
            best_ms = time_call(lambda: run(base), tiny)
        self.record(m, base, ms=best_ms)
        starts = [base]  # the other strategies that can serve this M, tried as well
        if m * p.top_k > 64 and not tiny:
            others: list[Strategy] = ["aligned", "dequant"]
            others += ["scan"] if m * p.top_k <= 128 and fmt != "bf16" else []
            starts += [dataclasses.replace(base, strategy=s) for s in others
                       if s != base.strategy]  # fmt: skip
        # (tiny: the gate/up phase only, the interpreter's cost is per program and per op)
        for phase in (gate_up_candidates,) if tiny else (gate_up_candidates, down_candidates):
            if phase is gate_up_candidates:
                pool = [c for s in starts for c in phase(fmt, m, s, tiny)] + starts[1:]
            else:
                pool = list(phase(fmt, m, best, tiny))
            for candidate in pool:
                if time.perf_counter() > deadline:
                    self.record(m, candidate, skipped="time budget")
                    continue
                try:
                    ms = time_call(functools.partial(run, candidate), tiny)
                except Exception as failure:  # a tile the compiler rejects: skip it, say so
                    self.record(m, candidate, error=repr(failure)[:300])
                    continue
                self.record(m, candidate, ms=ms)
                if ms < best_ms:
                    best, best_ms = candidate, ms
        error = 0.0 if best is base else relative_error(run(best), expected)
        if error > 1e-2:
            print(f"  {fmt} M={m}: winner differs from the heuristic by {error:.2e}; kept "
                  "the heuristic", flush=True)  # fmt: skip
            best = base
        return best, best_ms


def tune_format(sweep: Sweep, buckets: tuple[int, ...]) -> dict[int, MoELaunch]:
    sweep.weights = build_weights(sweep.problem, sweep.fmt, sweep.device)
    table: dict[int, MoELaunch] = {}
    for m in buckets:
        table[m], ms = sweep.bucket(m)
        print(f"  {sweep.fmt} M={m}: {table[m].strategy} {ms:.3f} ms", flush=True)
    sweep.weights = []
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU interpreter, tiny shapes")
    parser.add_argument("--formats", default=None, help="comma-separated (default: all)")
    parser.add_argument("--buckets", default=None, help="comma-separated token counts")
    parser.add_argument("--out-dir", type=Path, default=CONFIG_DIR)
    parser.add_argument("--log", type=Path, default=None, help="every measurement, as JSON")
    parser.add_argument("--budget-s", type=float, default=300.0, help="sweep time, all cells")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("tune_moe: no CUDA device; pass --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    import local_backend.kernels  # noqa: F401  (chooses the interpreter off CUDA)

    device = torch.device("cuda" if cuda else "cpu")
    problem = TINY if args.tiny else REAL
    formats = tuple(args.formats.split(",")) if args.formats else (
        ("int4",) if args.tiny else FORMATS)  # fmt: skip
    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else (
        TINY_BUCKETS if args.tiny else BUCKETS)  # fmt: skip
    budget = Budget(time.perf_counter() + args.budget_s, len(formats) * len(buckets))
    log: list[dict[str, object]] = []
    name = device_name(device)
    for fmt in formats:
        print(f"tuning {fmt} on {name}", flush=True)
        sweep = Sweep(problem, fmt, device, args.tiny, budget, log)
        table = tune_format(sweep, buckets)
        path = args.out_dir / config_file_name(name, fmt, problem.n_experts, problem.top_k,
                                               problem.dim, problem.inter)  # fmt: skip
        write_config(path, table)
        print(f"wrote {path}", flush=True)
    if args.log is not None:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text(json.dumps({"device": name, "runs": log}, indent=1) + "\n")
    skipped = sum(1 for entry in log if "skipped" in entry)
    if skipped:
        print(f"tune_moe: {skipped} candidates skipped to stay within {args.budget_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
