"""Triton is optional: with it unimportable, every local_backend module imports and the
quantized torch path serves (the issue: fused_moe imported names quant.py defines only with
triton, so `.[local]` alone could not load a model). In the main venv triton is hidden from a
subprocess; `make test-local-minimal`'s venv has none, so there it runs in-process."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HIDE_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as without the package
from tests.local_server.test_without_triton import serve_without_triton
print("completion tokens:", serve_without_triton(sys.argv[1]))
"""


def serve_without_triton(folder: str) -> int:
    """Import every local_backend module, serve a completion from int8 weights; its tokens."""
    import local_backend

    for module in pkgutil.walk_packages(local_backend.__path__, "local_backend."):
        importlib.import_module(module.name)
    from local_backend.kernels import HAS_TRITON, select_backend
    from local_backend.loader import load_service

    assert not HAS_TRITON and select_backend("cpu") == "torch"
    service = load_service(
        folder, device="cpu", weight_format="int8", max_slots=1, max_seq_len=64, progress=False
    )
    body = {"model": "wizardlm-2-8x22b", "prompt": [1, 415], "max_tokens": 3, "ignore_eos": True}
    try:
        answer = asyncio.run(service.completion(body))
    finally:
        service.engine.stop()
    return int(answer["usage"]["completion_tokens"])


def test_local_backend_imports_and_serves_quantized_without_triton(tiny_checkpoint: Path) -> None:
    if importlib.util.find_spec("triton") is None:  # a venv without triton: nothing to hide
        assert serve_without_triton(str(tiny_checkpoint)) == 3
        return
    done = subprocess.run(
        [sys.executable, "-c", HIDE_TRITON, str(tiny_checkpoint)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "completion tokens: 3" in done.stdout
