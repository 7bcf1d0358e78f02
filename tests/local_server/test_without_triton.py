"""Triton is optional: with it unimportable, every local_backend module imports and the
quantized torch path serves (the issue: fused_moe imported names quant.py defines only with
triton, so `.[local]` alone could not load a model). `make test-local-minimal` runs this
module (and the server tests) in a venv that has no triton at all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import asyncio, importlib, pkgutil, sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as without the package
import local_backend
for module in pkgutil.walk_packages(local_backend.__path__, "local_backend."):
    importlib.import_module(module.name)
from local_backend.kernels import HAS_TRITON, select_backend
from local_backend.loader import load_service
assert not HAS_TRITON and select_backend("cpu") == "torch"
service = load_service(sys.argv[1], device="cpu", weight_format="int8", max_slots=1,
                       max_seq_len=64, progress=False)
body = {"model": "wizardlm-2-8x22b", "prompt": [1, 415], "max_tokens": 3, "ignore_eos": True}
answer = asyncio.run(service.completion(body))
service.engine.stop()
print("completion tokens:", answer["usage"]["completion_tokens"])
"""


def test_local_backend_imports_and_serves_quantized_without_triton(tiny_checkpoint: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_checkpoint)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "completion tokens: 3" in done.stdout
