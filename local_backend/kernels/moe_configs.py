"""Launch configs of the MoE layer as data (the way vLLM keeps its fused-MoE configs).

    select_launch(device, fmt, n_experts, top_k, dim, inter, n_tokens) -> MoELaunch

A tuned file, `configs/device=<name>,format=<fmt>,E=<e>,top_k=<k>,dim=<d>,inter=<i>.json`,
maps token counts (M buckets) to a launch; the bucket nearest the call's M is used. Files are
written by scripts/tune_moe.py and read once per process (cached). Where no file matches the
device and shape, `default_launch` is the heuristic (tuned by reasoning for H100/H200-class
parts). A launch is a strategy plus the tiles of the two GEMMs of the layer:

    scan     packed experts, M small: each program finds its expert's rows among the routed
             pairs itself (no alignment pass), streams its slice of weights once (GEMV below
             16 rows per expert, tl.dot from 16), split-K on the down projection
    aligned  rows sorted and padded per expert (moe_align_block_size), tl.dot tiles: packed
             experts in the packed kernel, bf16 experts in fused_moe's kernel
    dequant  packed experts, M large: each hit expert is dequantized to bf16 once and its rows
             run through the dense bf16 GEMM (cuBLAS); compute-bound sizes gain nothing from
             dequantizing inside the tile
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .moe_tiles import MoEGemmConfig, choose_config
from .quant import FMT_FLOAT, FMT_INT4, FMT_INT8
from .runtime import cdiv, next_power_of_2, sm_count

Strategy = Literal["scan", "aligned", "dequant"]
STRATEGIES: tuple[Strategy, ...] = ("scan", "aligned", "dequant")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SCAN_MAX_PAIRS = 128  # the scan strategy's per-program pair scan is O(pairs) registers
_dirs: list[Path] = [CONFIG_DIR]


@dataclass(frozen=True)
class MoELaunch:
    strategy: Strategy
    gate_up: MoEGemmConfig = field(default_factory=lambda: MoEGemmConfig(16, 64, 128))
    down: MoEGemmConfig = field(default_factory=lambda: MoEGemmConfig(16, 64, 128))

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "gate_up": asdict(self.gate_up),
                "down": asdict(self.down)}  # fmt: skip

    @staticmethod
    def from_json(data: dict[str, Any]) -> MoELaunch:
        strategy = data["strategy"]
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown MoE strategy {strategy!r}")
        return MoELaunch(strategy, MoEGemmConfig(**data["gate_up"]),
                         MoEGemmConfig(**data["down"]))  # fmt: skip


def device_name(device: torch.device) -> str:
    """The CUDA device's name as it appears in config file names ("cpu" off CUDA)."""
    if device.type != "cuda":
        return "cpu"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_name(index: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", torch.cuda.get_device_name(index)).strip("_")


def config_file_name(
    device: str, fmt: str, n_experts: int, top_k: int, dim: int, inter: int
) -> str:
    return f"device={device},format={fmt},E={n_experts},top_k={top_k},dim={dim},inter={inter}.json"


@contextlib.contextmanager
def config_dirs(*dirs: Path) -> Iterator[None]:
    """Look up configs in `dirs` (before the packaged ones) inside the block: tests, tuning."""
    saved = list(_dirs)
    _dirs[:0] = [Path(d) for d in dirs]
    _clear_caches()
    try:
        yield
    finally:
        _dirs[:] = saved
        _clear_caches()


def _clear_caches() -> None:
    _load.cache_clear()
    select_launch.cache_clear()


@functools.cache
def _load(name: str) -> tuple[tuple[int, MoELaunch], ...]:
    """(M bucket, launch) pairs of the first config file called `name`, sorted; () if none."""
    for folder in _dirs:
        path = folder / name
        if path.is_file():
            table = json.loads(path.read_text(encoding="utf-8"))
            return tuple(sorted((int(m), MoELaunch.from_json(v)) for m, v in table.items()))
    return ()


def write_config(path: Path, table: dict[int, MoELaunch]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {str(m): table[m].to_json() for m in sorted(table)}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    _clear_caches()


def tuned_launch(
    device: torch.device, fmt: str, n_experts: int, top_k: int, dim: int, inter: int, m: int
) -> MoELaunch | None:
    """The launch of the nearest tuned M bucket for this device and shape, if a file has one."""
    table = _load(config_file_name(device_name(device), fmt, n_experts, top_k, dim, inter))
    if not table:
        return None
    return min(table, key=lambda item: (abs(item[0] - m), item[0]))[1]


def default_launch(
    device: torch.device,
    fmt: str,
    n_experts: int,
    top_k: int,
    dim: int,
    inter: int,
    m: int,
    sms: int | None = None,
) -> MoELaunch:
    """The heuristic: for packed int8/int4 experts, `scan` while M * top_k <= 64, `aligned` to
    256 rows per expert, `dequant` beyond (CUDA only: it syncs to read the counts); bf16 experts
    keep fused_moe.choose_config's tiles. `sms`: the device's SM count (tests: another device's)."""
    code = {"bf16": FMT_FLOAT, "int8": FMT_INT8, "int4": FMT_INT4}[fmt]
    if fmt == "bf16":
        return MoELaunch(
            "aligned",
            choose_config(m, top_k, n_experts, inter, dim, code, device),
            choose_config(m, top_k, n_experts, dim, inter, code, device),
        )
    pairs = m * top_k
    rows = pairs / max(1, min(n_experts, pairs))  # rows per hit expert, on average
    if pairs <= 64:
        # The dot-free GEMV up to 4 tokens: an expert then has at most M rows, so BLOCK_M = M
        # rows take them in one pass (each weight byte read once), and BLOCK_N keeps each
        # [rows, BLOCK_N, field] fp32 product tensor near 2048 values (16 registers a thread
        # at 4 warps; four of them live). From 8 tokens, tl.dot on 16-row blocks: padding
        # rows costs the tensor cores little, the GEMV's registers would spill.
        block_m = 16 if m > 4 else next_power_of_2(m)
        field = 128 // (8 if fmt == "int4" else 4)  # words a row reads per 128-input step
        block_n = 64 if block_m == 16 else max(16, min(128, 2048 // (block_m * field)))
        if device.type != "cuda":  # the interpreter: its cost is per program and per op
            block_m, block_n = 16, 128
        programs = min(n_experts, pairs) * cdiv(dim, block_n)
        split = max(1, min(8, cdiv(2 * (sms or sm_count(device)), programs)))
        return MoELaunch(
            "scan",
            MoEGemmConfig(block_m, block_n, 128, num_warps=4, num_stages=4),
            MoEGemmConfig(block_m, block_n, 128, split_k=split, num_warps=4, num_stages=4),
        )
    if rows <= 256 or device.type != "cuda":
        tiles = MoEGemmConfig(64, 64, 128, group_m=8, num_warps=4, num_stages=3)
        return MoELaunch("aligned", tiles, tiles)
    return MoELaunch("dequant")


@functools.lru_cache(maxsize=4096)  # called per layer per step: a dict lookup after the first
def select_launch(
    device: torch.device, fmt: str, n_experts: int, top_k: int, dim: int, inter: int, m: int
) -> MoELaunch:
    """The tuned launch for this call if a config file covers it, else the heuristic."""
    tuned = tuned_launch(device, fmt, n_experts, top_k, dim, inter, m)
    if tuned is not None and not (tuned.strategy == "scan" and m * top_k > SCAN_MAX_PAIRS):
        return tuned
    return default_launch(device, fmt, n_experts, top_k, dim, inter, m)
