"""Launch configs as data: scripts/tune_moe.py --tiny writes a JSON file, moe_configs reads it
back (nearest M bucket, cached) and the packed kernel launches with exactly those tiles; no
file for a device means the heuristic."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from local_backend.kernels import packed_moe, reference
from local_backend.kernels.fused_moe import MoEGemmConfig, fused_experts
from local_backend.kernels.moe_configs import (
    MoELaunch,
    config_dirs,
    config_file_name,
    default_launch,
    select_launch,
    tuned_launch,
    write_config,
)

from .helpers import FP32, assert_near, requires_triton
from .test_packed_moe import DIM, TOP_K, E, packed_experts_of

INTER = 128  # the tuner's --tiny problem: dim 128, inter 128

ROOT = Path(__file__).resolve().parents[2]


def load_tuner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tune_moe", ROOT / "scripts" / "tune_moe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def spy_launches(monkeypatch: pytest.MonkeyPatch) -> list[MoEGemmConfig]:
    """Record the config of every packed GEMM launch (the real launch still runs)."""
    seen: list[MoEGemmConfig] = []
    real = packed_moe._launch_packed

    def spy(*args: Any) -> None:
        seen.append(args[-1])
        real(*args)

    monkeypatch.setattr(packed_moe, "_launch_packed", spy)
    return seen


@requires_triton
def test_tiny_sweep_writes_json_the_kernel_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tuner = load_tuner()
    assert tuner.main(["--tiny", "--out-dir", str(tmp_path), "--buckets", "1,8"]) == 0
    name = config_file_name("cpu", "int4", E, TOP_K, DIM, INTER)
    path = tmp_path / name
    table = json.loads(path.read_text())
    assert sorted(int(m) for m in table) == [1, 8]
    # make the file's M = 8 entry one the heuristic never picks (block_n 16, split 3), so
    # that the kernel following it proves the file is read, not a coincidence
    table["8"]["gate_up"]["block_n"] = 16
    table["8"]["down"].update(block_n=16, split_k=3)
    path.write_text(json.dumps(table))
    w1, w3, w2 = packed_experts_of("int4", inter=INTER)
    seen = spy_launches(monkeypatch)
    cpu = torch.device("cpu")
    with config_dirs(tmp_path):
        from_file = {m: MoELaunch.from_json(v) for m, v in ((int(k), v) for k, v in table.items())}
        assert select_launch(cpu, "int4", E, TOP_K, DIM, INTER, 8) == from_file[8]
        assert select_launch(cpu, "int4", E, TOP_K, DIM, INTER, 6) == from_file[8]  # nearest
        assert select_launch(cpu, "int4", E, TOP_K, DIM, INTER, 2) == from_file[1]
        x = torch.randn(6, DIM)
        weights, ids = reference.route(torch.randn(6, E), TOP_K)
        out = fused_experts(x, weights, ids, w1, w3, w2)
    assert_near(out, reference.moe_experts(x, weights, ids, w1, w3, w2), FP32)
    gate_up, down = seen
    assert gate_up.block_n == 16 and gate_up.split_k == 1  # gate/up never splits K
    assert (down.block_n, down.split_k) == (16, 3)
    # outside the block the file is not searched: the heuristic again
    assert tuned_launch(cpu, "int4", E, TOP_K, DIM, INTER, 8) is None


def test_unknown_device_or_shape_falls_back_to_the_heuristic(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    launch = MoELaunch("dequant")
    write_config(tmp_path / config_file_name("cpu", "int8", E, TOP_K, DIM, INTER), {64: launch})
    with config_dirs(tmp_path):
        assert select_launch(cpu, "int8", E, TOP_K, DIM, INTER, 4096) == launch
        other_shape = select_launch(cpu, "int8", E, TOP_K, DIM * 2, INTER, 4096)
        assert other_shape == default_launch(cpu, "int8", E, TOP_K, DIM * 2, INTER, 4096)
        # a tuned scan launch is not used past the pairs the scan handles
        write_config(tmp_path / config_file_name("cpu", "int4", E, TOP_K, DIM, INTER),
                     {1: MoELaunch("scan")})  # fmt: skip
        assert select_launch(cpu, "int4", E, TOP_K, DIM, INTER, 4096).strategy != "scan"


def test_bf16_reads_tuned_tiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 experts (fused_moe's own kernel) take their tiles from a file too."""
    tiles = MoEGemmConfig(16, 32, 32, num_warps=2)
    write_config(tmp_path / config_file_name("cpu", "bf16", E, TOP_K, DIM, INTER),
                 {1: MoELaunch("aligned", tiles, tiles)})  # fmt: skip
    with config_dirs(tmp_path):
        launch = tuned_launch(torch.device("cpu"), "bf16", E, TOP_K, DIM, INTER, 3)
    assert launch is not None and launch.gate_up == tiles
