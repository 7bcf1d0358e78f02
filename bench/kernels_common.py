"""Shared by the kernel benchmarks: the device and its peak figures, timing, and the
docs/benchmarks.md section they write (between <!-- kernels:start --> and <!-- kernels:end -->,
one sub-section per script, nothing else in the file touched)."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
OUT = ROOT / "bench" / "out"

# Datasheet peaks (dense bf16 tensor-core math, HBM bandwidth), by a substring of the CUDA name.
PEAKS: list[tuple[str, float, float]] = [  # (name contains, bytes/s, bf16 FLOP/s)
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100", 1.555e12, 312e12),
]


@dataclass
class Device:
    name: str
    peak_bandwidth: float | None  # bytes/s from the datasheet, None if unknown
    peak_flops: float | None
    copy_bandwidth: float | None  # measured device-to-device copy (read + write), bytes/s

    @property
    def is_cuda(self) -> bool:
        return self.peak_bandwidth is not None or self.name.startswith("NVIDIA")

    def label(self) -> str:
        if self.peak_bandwidth is None:
            return self.name
        return f"{self.name} (peak {self.peak_bandwidth / 1e12:.2f} TB/s HBM)"


def detect_device() -> Device:
    if not torch.cuda.is_available():
        import platform

        return Device(f"CPU ({platform.processor() or platform.machine()})", None, None, None)
    name = torch.cuda.get_device_name()
    bandwidth = flops = None
    for key, bytes_per_s, flop_per_s in PEAKS:
        if key in name:
            bandwidth, flops = bytes_per_s, flop_per_s
            break
    return Device(name, bandwidth, flops, measure_copy_bandwidth())


def measure_copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """A large device-to-device copy: what streaming kernels can hope to reach."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * n_bytes / (ms / 1e3)


QUICK = {"on": False}  # set by --tiny: one timed call, no warm-up (smoke runs only)


def time_ms(
    fn: Callable[[], object], warmup: int = 5, reps: int = 50, budget_ms: float = 2000
) -> float:
    """Median milliseconds of fn(): CUDA events on a GPU, wall clock otherwise. Slow calls get
    fewer repetitions (about `budget_ms` in all, at least 3)."""
    if not QUICK["on"]:
        fn()  # the first call compiles the triton kernels: never timed, never the estimate
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    first_ms = (time.perf_counter() - start) * 1e3
    if QUICK["on"]:
        return first_ms
    reps = max(3, min(reps, int(budget_ms / max(first_ms, 1e-3))))
    for _ in range(min(warmup, reps)):
        fn()
    if not torch.cuda.is_available():
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end))
    return statistics.median(samples)


def write_section(name: str, body: str) -> None:
    """Replace sub-section `name` of the kernels section of docs/benchmarks.md (creating the
    file, the section or the sub-section as needed; other sections are left byte for byte)."""
    start, end = "<!-- kernels:start -->", "<!-- kernels:end -->"
    sub_start, sub_end = f"<!-- kernels:{name}:start -->", f"<!-- kernels:{name}:end -->"
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n## Kernels (local backend)\n\n{end}\n"
    head, rest = text.split(start, 1)
    section, tail = rest.split(end, 1)
    block = f"{sub_start}\n{body.strip()}\n{sub_end}"
    pattern = re.compile(re.escape(sub_start) + ".*?" + re.escape(sub_end), re.DOTALL)
    if pattern.search(section):
        section = pattern.sub(lambda _: block, section)
    else:
        section = section.rstrip("\n") + f"\n\n{block}\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(head + start + section + end + tail, encoding="utf-8")
