"""The stats contract: one interface over the in-memory and the Redis store.

Writes (`record_attempt`, `record_usage`) are synchronous, never block and never touch the
network: they append to a local buffer that a background task flushes in batches. Reads
(`route_health`, `usage`) come from a local snapshot that the same task refreshes, so the
router can consult health on every request without a round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream attempt, recorded exactly once whether it succeeded or not."""

    route_id: str
    ok: bool
    latency_s: float  # request start to last byte (or to the failure)
    ttft_s: float | None = None  # time to first token, streams and non-streams alike
    completion_tokens: int = 0
    error_kind: str | None = None  # e.g. "timeout", "http_500", "connect"; None when ok
    at: float | None = None  # unix time; None = now


@dataclass(frozen=True, slots=True)
class Usage:
    """One served response's usage, recorded exactly once."""

    route_id: str
    model: str
    client_key: str  # a key id (never the secret itself): e.g. its first 8 chars of sha256
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    at: float | None = None


@dataclass(frozen=True, slots=True)
class WindowStats:
    requests: int = 0
    failures: int = 0
    uptime: float | None = None  # successes / requests; None when no requests in window
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    tokens_per_s: float | None = None  # median completion throughput


@dataclass(frozen=True, slots=True)
class RouteHealth:
    route_id: str
    windows: dict[str, WindowStats] = field(default_factory=dict)  # keys "5m", "30m", "1d"
    consecutive_failures: int = 0
    last_failure_at: float | None = None
    circuit_open: bool = False  # too many recent failures: try this route last

    @property
    def recently_failed(self) -> bool:
        return self.circuit_open or self.consecutive_failures > 0


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class StatsStore(Protocol):
    def record_attempt(self, attempt: Attempt) -> None: ...

    def record_usage(self, usage: Usage) -> None: ...

    def route_health(self, route_id: str) -> RouteHealth: ...

    async def usage(self, *, by: str, day: str | None = None) -> dict[str, UsageTotals]:
        """Totals grouped by "route", "model" or "client" for a UTC day (YYYY-MM-DD, default today)."""
        ...

    async def start(self) -> None: ...

    async def flush(self) -> None:
        """Push every pending delta now (tests and shutdown)."""
        ...

    async def refresh(self) -> None:
        """Reload the health snapshot now (tests)."""
        ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None:
        """Flush what is pending, then stop the background task."""
        ...

    @property
    def pending(self) -> int:
        """Deltas buffered but not yet persisted (bounded)."""
        ...
