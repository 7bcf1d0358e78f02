"""What the engine measures about itself, for /metrics, /readyz and the gateway's price.

    telemetry = EngineTelemetry()
    telemetry.record_step(scheduler.last_step)  # prefill tokens, decode batch, seconds
    telemetry.record_first_token(0.41); telemetry.record_token_gap(0.026)
    telemetry.record_cancel("queued")           # or "running"
    telemetry.throughput()                      # rolling tokens/s: prefill, decode, decode by batch

Pure Python and thread-safe (the engine thread writes, HTTP handlers read); local_backend/
metrics.py renders it for Prometheus at scrape time, so the engine never imports a metrics
library. Throughput is rolling over the last `window_steps` forward passes, per batch size for
decode: a price computed from it follows the batch the backend really runs at.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

# Seconds. TTFT spans queueing plus prefill; a gap is the time between two steps' deliveries
# of tokens to one request (the step that completes a prompt delivers two tokens at once).
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CANCEL_WHERE = ("queued", "running")


class StepTiming(Protocol):
    """What one scheduler step ran (local_backend.scheduler.StepTiming)."""

    prefill_tokens: int
    prefill_s: float
    decode_batch: int
    decode_s: float


@dataclass
class Histogram:
    """Fixed buckets (upper bounds, seconds); `cumulative()` is Prometheus' `le` form."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class RollingRate:
    """Tokens per second of busy time over the last `window` passes."""

    def __init__(self, window: int) -> None:
        self._passes: deque[tuple[int, float]] = deque(maxlen=window)

    def add(self, tokens: int, seconds: float) -> None:
        self._passes.append((tokens, seconds))

    @property
    def samples(self) -> int:
        return len(self._passes)

    def per_second(self) -> float | None:
        seconds = sum(s for _, s in self._passes)
        if not self._passes or seconds <= 0:
            return None
        return sum(t for t, _ in self._passes) / seconds


class EngineTelemetry:
    def __init__(self, window_steps: int = 256) -> None:
        self._lock = threading.Lock()
        self._window = window_steps
        self.ttft = Histogram(TTFT_BUCKETS)
        self.token_gap = Histogram(TOKEN_GAP_BUCKETS)
        self.cancelled = dict.fromkeys(CANCEL_WHERE, 0)
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self._prefill = RollingRate(window_steps)
        self._decode = RollingRate(window_steps)
        self._decode_by_batch: dict[int, RollingRate] = {}

    def record_step(self, step: StepTiming) -> None:
        prefill_tokens, prefill_s = step.prefill_tokens, step.prefill_s
        decode_batch, decode_s = step.decode_batch, step.decode_s
        with self._lock:
            if prefill_tokens:
                self.prefill_tokens += prefill_tokens
                self._prefill.add(prefill_tokens, prefill_s)
            if decode_batch:
                self.decode_tokens += decode_batch
                self._decode.add(decode_batch, decode_s)
                rate = self._decode_by_batch.setdefault(decode_batch, RollingRate(self._window))
                rate.add(decode_batch, decode_s)

    def record_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def record_token_gap(self, seconds: float) -> None:
        with self._lock:
            self.token_gap.observe(seconds)

    def record_cancel(self, where: str) -> None:
        with self._lock:
            self.cancelled[where] += 1

    def throughput(self) -> dict[str, Any]:
        """Rolling tokens/s (None before any such pass); decode also per batch size, with how
        many passes each figure rests on."""
        with self._lock:
            by_batch = {
                str(batch): {"tokens_per_s": rate.per_second(), "steps": rate.samples}
                for batch, rate in sorted(self._decode_by_batch.items())
            }
            return {
                "prefill_tokens_per_s": self._prefill.per_second(),
                "decode_tokens_per_s": self._decode.per_second(),
                "decode_by_batch": by_batch,
                "window_steps": self._window,
            }

    def snapshot(self) -> dict[str, Any]:
        """Copies of the histograms and counters, taken under the lock (for /metrics)."""
        with self._lock:
            return {
                "ttft": (self.ttft.cumulative(), self.ttft.total),
                "token_gap": (self.token_gap.cumulative(), self.token_gap.total),
                "cancelled": dict(self.cancelled),
                "prefill_tokens": self.prefill_tokens,
                "decode_tokens": self.decode_tokens,
            }
