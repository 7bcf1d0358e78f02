"""The packed MoE modules import, and their torch paths run, where triton is not installed
(triton is an optional dependency): checked in a subprocess whose imports of triton fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is not installed (simulated)")

sys.meta_path.insert(0, NoTriton())
import torch
from local_backend.kernels import moe_configs, packed, packed_kernels, packed_moe, runtime
from local_backend.kernels.quant import quantize
from local_backend.quantize import quantize_model  # noqa: F401 (imports the kernels package)

assert not runtime.HAS_TRITON and not hasattr(packed_kernels, "packed_moe_kernel")
w = [packed.repack(quantize(torch.randn(s), "int4")) for s in ((8, 64, 32),) * 2 + ((8, 32, 64),)]
x, weights, ids = torch.randn(2, 32), torch.full((2, 2), 0.5), torch.tensor([[0, 1], [2, 3]])
try:
    packed_moe.packed_experts(x, weights, ids, *w)
except runtime.TritonUnavailable:
    pass
else:
    raise AssertionError("the packed kernels ran without triton")
assert packed_moe.dense_experts(x, weights, ids, *w).shape == (2, 32)
print("ok")
"""


def test_packed_moe_modules_import_without_triton() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
