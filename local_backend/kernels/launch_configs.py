"""Tuned launch configurations as data: JSON files under kernels/configs/, one per device.

    lookup(kernel, device, shape_key, point) -> dict | None

A file `configs/<kernel>/<device_key>.json` (written by bench/tune_kernels.py) reads

    {"device": "NVIDIA H200", "kernel": "dense_quant",
     "configs": {"int4 N=6144 K=6144": {"1": {...}, "16": {...}, "4096": {...}}}}

`shape_key` names the static shape a kernel is tuned for (format, N, K; or heads and head
dim) and each entry under it is a bucket: one integer (M, the rows of a GEMM) or several joined
by "x" (batch x context for attention). `lookup` returns the entry whose bucket is nearest
to `point` in log distance (tuning samples powers of two; 24 rows should take the 16- or
32-row config, not one tuned for 4096), or None where the device or shape was never tuned:
the kernel then uses its own heuristic. Nothing here knows what a config means.

`use_directory(path)` adds a directory searched before the packaged one (the tuner's
--tiny mode, tests); device keys are the CUDA name with non-alphanumerics as "_", or "cpu".
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_extra_dirs: list[Path] = []


def device_key(device: torch.device | str) -> str:
    """A file-name-safe name of the device kind: "NVIDIA_H200", "NVIDIA_H100_80GB_HBM3"."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    return _cuda_key(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_key(index: int) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(index)).strip("_")


def use_directory(path: Path | str | None) -> None:
    """Search `path` first (None: back to the packaged configs only)."""
    _extra_dirs.clear()
    if path is not None:
        _extra_dirs.append(Path(path))
    _load.cache_clear()
    _nearest.cache_clear()


def config_path(kernel: str, key: str, directory: Path | None = None) -> Path:
    return (directory or CONFIG_DIR) / kernel / f"{key}.json"


@functools.cache
def _load(kernel: str, key: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Shape key -> bucket -> config, merged over the directories (earlier ones win)."""
    merged: dict[str, dict[str, dict[str, Any]]] = {}
    for directory in [*_extra_dirs, CONFIG_DIR]:
        path = config_path(kernel, key, directory)
        if not path.is_file():
            continue
        try:
            configs = json.loads(path.read_text(encoding="utf-8")).get("configs", {})
        except (OSError, ValueError, AttributeError):
            continue  # a broken file must not take the kernel down: the heuristic serves
        for shape, buckets in configs.items():
            if isinstance(buckets, dict):
                merged.setdefault(shape, {}).update(
                    {b: c for b, c in buckets.items() if b not in merged.get(shape, {})}
                )
    return merged


def parse_bucket(bucket: str) -> tuple[int, ...]:
    return tuple(int(part) for part in bucket.split("x"))


def bucket_name(*point: int) -> str:
    return "x".join(str(int(p)) for p in point)


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return sum(abs(math.log2(max(x, 1)) - math.log2(max(y, 1))) for x, y in zip(a, b, strict=True))


def lookup(
    kernel: str, device: torch.device | str, shape_key: str, point: tuple[int, ...]
) -> dict[str, Any] | None:
    """The tuned config nearest `point` for this kernel, device and shape, or None (cached:
    kernels ask on every eager call)."""
    found = _nearest(kernel, device_key(device), shape_key, tuple(point))
    return dict(found) if found is not None else None


@functools.lru_cache(maxsize=4096)
def _nearest(
    kernel: str, key: str, shape_key: str, point: tuple[int, ...]
) -> dict[str, Any] | None:
    buckets = _load(kernel, key).get(shape_key)
    if not buckets:
        return None
    candidates = []
    for name, config in buckets.items():
        try:
            parsed = parse_bucket(name)
        except ValueError:
            continue
        if len(parsed) == len(point) and isinstance(config, dict):
            candidates.append((_distance(parsed, point), parsed, config))
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def write_configs(
    kernel: str,
    device_name: str,
    key: str,
    configs: dict[str, dict[str, dict[str, Any]]],
    directory: Path | None = None,
) -> Path:
    """Write (merging into an existing file) the tuned configs of one kernel on one device."""
    path = config_path(kernel, key, directory)
    existing: dict[str, dict[str, dict[str, Any]]] = {}
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8")).get("configs", {})
        except ValueError:
            existing = {}
    for shape, buckets in configs.items():
        existing.setdefault(shape, {}).update(buckets)
    body = {"device": device_name, "kernel": kernel, "configs": existing}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    _load.cache_clear()
    _nearest.cache_clear()
    return path
