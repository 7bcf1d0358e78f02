"""The stats contract: one interface over the in-memory and the Redis store.

Writes (`record_attempt`, `record_usage`) are synchronous, never raise, never block and never
touch the network: they fold into a bounded local buffer that a background task flushes in
batches. Reads (`route_health`, `usage`) come from a local snapshot that the same task
refreshes, so the router can consult health on every request without a round trip.

    stats = make_stats(settings.redis_url, prefix=..., flush_interval_s=...)  # gateway.stats
    await stats.start()
    stats.record_attempt(Attempt("deepinfra/microsoft/WizardLM-2-8x22B", ok=True, latency_s=1.2))
    stats.route_health(route_id).circuit_open         # microseconds, local
    await stats.usage(by="model", day="2024-05-01")    # admin reads; may hit Redis
    await stats.aclose()                                # flushes what is pending
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

WINDOW_NAMES = ("5m", "30m", "1d")
USAGE_GROUPS = ("route", "model", "client")
CircuitStatus = Literal["closed", "open", "half_open"]

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class StatsUnavailableError(RuntimeError):
    """A read that needs the shared store (usage totals) could not reach it: answer 503."""


# Attempt and Usage are values nobody changes after making them, but not `frozen`: a frozen
# dataclass sets each field through object.__setattr__, and two are made per request.
@dataclass(slots=True)
class Attempt:
    """One upstream attempt, recorded exactly once whether it succeeded or not."""

    route_id: str
    ok: bool
    latency_s: float  # request start to last byte (or to the failure)
    ttft_s: float | None = None  # time to first token, streams and non-streams alike
    completion_tokens: int = 0
    error_kind: str | None = None  # e.g. "timeout", "http_500", "connect"; None when ok
    at: float | None = None  # unix time; None = now


@dataclass(slots=True)
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
    requests: int = 0  # attempts in the window
    failures: int = 0
    uptime: float | None = None  # successes / requests; None when no requests in window
    latency_p50_s: float | None = None  # within 5% of the true sample (see windows.py)
    latency_p99_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    tokens_per_s: float | None = None  # median completion throughput of successful attempts


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    """One bucket of a dashboard series: its start (unix s) and what happened in it."""

    start: int
    stats: WindowStats


@dataclass(frozen=True, slots=True)
class RouteHealth:
    route_id: str
    # keys "5m", "30m", "1d"; the stores compute each on first access (a read-only mapping)
    windows: Mapping[str, WindowStats] = field(default_factory=dict)
    consecutive_failures: int = 0
    last_failure_at: float | None = None
    circuit_open: bool = False  # too many recent failures: try this route last
    # "half_open": the cool-down is over; the next outcome closes (success) or reopens it
    circuit: CircuitStatus = "closed"

    @property
    def recently_failed(self) -> bool:
        return self.circuit_open or self.consecutive_failures > 0


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0  # summed exactly in pico-dollars, then converted


@dataclass(frozen=True, slots=True)
class StatsOptions:
    """Tuning shared by both stores (the memory store ignores the Redis-only ones)."""

    prefix: str = "moegw:"  # Redis key namespace; use a hash tag ("{moegw}:") on Redis Cluster
    # how often buffered deltas go to Redis (one pipeline); in memory, fold into the windows
    flush_interval_s: float = 0.5
    refresh_interval_s: float = 1.0  # how often the health snapshot reloads the recent buckets
    full_refresh_s: float = 10.0  # how often it reloads every bucket of every window
    max_pending: int = (
        100_000  # buffered entries beyond which latency samples are shed (pending.py)
    )
    failure_threshold: int = 5  # consecutive failures that open a route's circuit
    cooldown_s: float = 30.0  # open -> half-open after this long without a new failure
    usage_ttl_days: int = 35  # daily usage hashes expire this long after their day ends
    writer_ttl_s: float = 7 * 86400  # how long Redis remembers a writer's last applied batch
    socket_timeout_s: float = 2.0  # Redis connect / read timeout (a flush never waits longer)
    close_timeout_s: float = 5.0  # aclose() gives up flushing after this long

    def __post_init__(self) -> None:
        positive = ("flush_interval_s", "refresh_interval_s", "full_refresh_s", "cooldown_s")
        for name in (*positive, "writer_ttl_s", "socket_timeout_s", "close_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"stats option {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_pending", "failure_threshold", "usage_ttl_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"stats option {name} must be >= 1, got {getattr(self, name)!r}")
        if not self.prefix:
            raise ValueError("stats option prefix must not be empty")


def check_usage_query(by: str, day: str | None) -> None:
    """Bad admin input becomes a clear ValueError (the API answers 400)."""
    if by not in USAGE_GROUPS:
        raise ValueError(f"usage can be grouped by {', '.join(USAGE_GROUPS)}; got {by!r}")
    if day is not None and not _DAY.match(day):
        raise ValueError(f"day must be a UTC date YYYY-MM-DD; got {day!r}")


class RecordObserver(Protocol):
    """Sees every record a store accepts (the dashboard's request log): must not block."""

    def attempt(self, attempt: Attempt) -> None: ...

    def usage(self, usage: Usage) -> None: ...


class StatsStore(Protocol):
    observer: RecordObserver | None

    def record_attempt(self, attempt: Attempt) -> None: ...

    def record_usage(self, usage: Usage) -> None: ...

    def route_health(self, route_id: str) -> RouteHealth: ...

    async def usage(self, *, by: str, day: str | None = None) -> dict[str, UsageTotals]:
        """Totals grouped by "route", "model" or "client" for a UTC day (YYYY-MM-DD, default
        today). ValueError on a bad `by`/`day`; StatsUnavailableError when Redis is down."""
        ...

    async def history(self, route_ids: list[str], span: str) -> dict[str, list[SeriesPoint]]:
        """Each route's series over "1h", "24h" or "7d" (windows.SERIES), oldest bucket first,
        one point per bucket (empty buckets included). For the dashboard, never the router:
        the Redis store reads it from Redis. ValueError on a bad span; StatsUnavailableError
        when Redis is down."""
        ...

    async def start(self) -> None: ...

    async def flush(self) -> None:
        """Push every pending delta now (tests and shutdown). Never raises: when Redis is down
        the deltas stay pending and `pending` says how many records wait."""
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
        """Records (attempts + usages) accepted but not yet persisted. The memory they take is
        bounded: they are coalesced by bucket and usage key (see pending.py)."""
        ...
