"""How far a weight load has come, and the backend's load state as data.

    progress = LoadProgress()              # a tqdm bar on a terminal, else a log line every 10 s
    progress.begin(bytes_total, shards_total); progress.advance(nbytes); progress.shard_done()
    progress.close()                       # the last line: bytes, shards, seconds, GB/s
    progress.snapshot()                    # {"bytes_done", "bytes_total", "fraction", ...}

    state = LoadState()                    # "loading" (with progress) -> "ready" | "failed"
    state.fail("WeightsError: ... lacks 3 tensor(s) ..."); state.as_json()

A 130 GB load takes minutes: an operator at a terminal sees the bar, a container log gets
periodic lines, and /readyz (server.py) and the gateway read `LoadState` rather than a log.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

log = logging.getLogger(__name__)

LoadPhase = Literal["loading", "ready", "failed"]
GB = 1e9


class LoadProgress:
    def __init__(
        self, *, enabled: bool = True, bar: bool | None = None, log_every_s: float = 10.0
    ) -> None:
        self.enabled = enabled
        self._bar_wanted = sys.stderr.isatty() if bar is None else bar
        self._log_every_s = log_every_s
        self._bar: Any = None
        self.bytes_total = 0
        self.bytes_done = 0
        self.shards_total = 0
        self.shards_done = 0
        self._shards_bytes = 0  # file sizes of the shards read so far
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._last_log = 0.0

    def begin(self, bytes_total: int, shards_total: int) -> None:
        self.bytes_total, self.shards_total = bytes_total, shards_total
        self.started_at = self._last_log = time.monotonic()
        if self.enabled and self._bar_wanted:
            from tqdm import tqdm

            self._bar = tqdm(
                total=bytes_total,
                unit="B",
                unit_scale=True,
                desc="loading weights",
                file=sys.stderr,
            )
        elif self.enabled:
            log.info("loading %.1f GB of weights from %d shard(s)", bytes_total / GB, shards_total)

    def advance(self, nbytes: int) -> None:
        self.bytes_done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
        elif self.enabled and time.monotonic() - self._last_log >= self._log_every_s:
            self._last_log = time.monotonic()
            log.info("loading weights: %s", self.describe())

    def shard_done(self, shard_bytes: int | None = None) -> None:
        """One file read; its size (headers included) tops up the tensors' byte count."""
        self.shards_done += 1
        if shard_bytes is not None:
            self._shards_bytes += shard_bytes
            self.bytes_done = max(self.bytes_done, min(self._shards_bytes, self.bytes_total))
            if self._bar is not None:
                self._bar.n = self.bytes_done
        if self._bar is not None:
            self._bar.set_postfix_str(f"shard {self.shards_done}/{self.shards_total}")
            self._bar.refresh()

    def close(self) -> None:
        self.finished_at = time.monotonic()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled and self.started_at is not None:
            log.info("loaded weights: %s", self.describe())

    def elapsed_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.monotonic()) - self.started_at

    def describe(self) -> str:
        snap = self.snapshot()
        return (
            f"{snap['bytes_done'] / GB:.2f}/{snap['bytes_total'] / GB:.2f} GB, shard "
            f"{snap['shards_done']}/{snap['shards_total']}, {snap['elapsed_s']:.0f} s, "
            f"{snap['gb_per_s']:.2f} GB/s"
        )

    def snapshot(self) -> dict[str, Any]:
        elapsed = self.elapsed_s()
        return {
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "fraction": self.bytes_done / self.bytes_total if self.bytes_total else 0.0,
            "shards_done": self.shards_done,
            "shards_total": self.shards_total,
            "elapsed_s": round(elapsed, 3),
            "gb_per_s": self.bytes_done / GB / elapsed if elapsed > 0 else 0.0,
        }


class LoadState:
    """loading -> ready | failed; written by the loading thread, read by HTTP handlers."""

    def __init__(self, progress: LoadProgress | None = None) -> None:
        self.progress = progress or LoadProgress()
        self.phase: LoadPhase = "loading"
        self.reason: str | None = None

    def ready(self) -> None:
        self.phase = "ready"

    def fail(self, reason: str) -> None:
        self.reason, self.phase = reason, "failed"

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.phase}
        if self.phase == "loading":
            body["progress"] = self.progress.snapshot()
        if self.reason is not None:
            body["reason"] = self.reason
        return body
