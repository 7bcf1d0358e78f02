"""Kernel tests run the Triton kernels on CPU through triton's interpreter (no GPU needed).

The interpreter has to be chosen before triton is first imported, so this file sets
TRITON_INTERPRET=1 (where there is no CUDA) before anything imports triton;
local_backend.kernels does the same on import for the same reason. Shapes stay small: the
interpreter runs each program instance in numpy. Tests marked `gpu` run the real kernels at
8x22B shapes and are skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _gpu_marker(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
