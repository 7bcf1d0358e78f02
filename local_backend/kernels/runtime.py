"""What the kernels need to know about the machine they run on.

Triton is optional: where it is missing the kernels raise `TritonUnavailable` and
`select_backend` answers "torch". Off CUDA, triton runs in interpreter mode (numpy on CPU
tensors; switched on below, or by TRITON_INTERPRET=1), slow but exact enough for tests. The
interpreter gets bf16 arithmetic wrong (and truncates fp32 -> bf16 instead of rounding), so the
kernels do all math in fp32 and `interpreting()` tells them to cast tiles to fp32 before
`tl.dot`; on a GPU the same kernels feed bf16 tiles to the tensor cores.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    # Without CUDA the interpreter is the only way a triton kernel can run at all. It must be
    # chosen before triton is imported (triton.language's own helpers are decorated then),
    # hence an environment write, not a read. The torch backend stays the default off CUDA;
    # this only serves an explicit "triton" choice, tests and CPU benchmarks.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # triton is a dev/GPU dependency, never a hard one
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


class TritonUnavailable(RuntimeError):
    """The triton backend was asked for where it cannot run."""


def require_triton() -> None:
    if not HAS_TRITON:
        raise TritonUnavailable(
            "the triton backend needs the `triton` package (pip install triton)"
        )


@functools.cache
def interpreting() -> bool:
    """True when triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    if not HAS_TRITON:
        return False

    @triton.jit
    def _probe(x_ptr):  # never launched: only its type says how triton was configured
        pass

    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels take CUDA tensors, or CPU tensors under the interpreter."""
    require_triton()
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise TritonUnavailable(
            f"triton kernels need CUDA tensors (got {t.device}); on CPU use the torch backend, "
            "or import local_backend.kernels (or set TRITON_INTERPRET=1) before triton"
        )


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a small stand-in off CUDA so grids stay small."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(num_warps: int, num_stages: int) -> dict[str, Any]:
    """Launch kwargs; the interpreter ignores them, CUDA uses them."""
    return {"num_warps": num_warps, "num_stages": num_stages}


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
_MIN_COUNTERS = 1 << 16


def tile_counters(device: torch.device, tiles: int = _MIN_COUNTERS) -> torch.Tensor:
    """Zeroed int32 counters for kernels whose programs meet at the end (split-K GEMV, split
    attention: the last program of a tile to arrive reduces the others' partials). Shared by
    every launch on the device: launches on one stream never overlap, and each leaves its
    counters at 0. Old buffers are kept alive: a captured CUDA graph may still point at them."""
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < tiles:
        size = max(_MIN_COUNTERS, next_power_of_2(tiles))
        buffers.append(torch.zeros(size, dtype=torch.int32, device=device))
    return buffers[-1]
