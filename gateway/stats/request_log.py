"""The live request log of the dashboard: the last attempts, newest first, with what they cost.

    log = RequestLog(size=500, redis_url=settings.redis_url, prefix=settings.stats_prefix)
    stats.observer = log            # the stores hand every attempt and usage record to it
    await log.start() ... await log.aclose()
    await log.recent(limit=100, route="lepton/...", status="error")   # list of dicts

It is fed by the stats stores' writes (one `attempt` per upstream attempt, one `usage` per
served segment), so it sees exactly what the stats see and adds nothing to the request path but
a deque append. A served attempt is followed by its usage record on the same route in the same
call sequence (dispatch writes the attempt, then settles), so the usage fills in the attempt's
prompt tokens and cost; an attempt that fails has none.

Without Redis the log is this process's. With Redis, a background task pushes entries (once
their usage had time to arrive) to one capped list, `<prefix>requests`, every `flush_interval_s`,
so every replica's dashboard shows every replica's attempts. Reads fall back to the local log
when Redis is down (`shared` in the answer says which). Entries carry key ids, never keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gateway.redis_client import redis_client
from gateway.stats.base import Attempt, StatsUnavailableError, Usage

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.stats")

STATUS_FILTERS = ("all", "ok", "error")
SETTLE_S = 0.5  # how long an entry waits for its usage before it is shared


@dataclass(slots=True)
class LoggedAttempt:
    at: float  # unix time the attempt ended
    route: str
    ok: bool
    error: str | None  # the attempt's error kind ("http_500", "timeout_headers", ...)
    status: int | None  # the upstream's HTTP status when known (200 for a success)
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    cost_usd: float | None = None
    client: str | None = None  # key id

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def status_of(attempt: Attempt) -> int | None:
    if attempt.ok:
        return 200
    kind = attempt.error_kind or ""
    if kind.startswith("http_") and kind[5:].isdigit():
        return int(kind[5:])
    return {"auth": 401}.get(kind)


def _matches(entry: dict[str, Any], route: str | None, status: str) -> bool:
    if route and entry.get("route") != route:
        return False
    if status == "ok":
        return bool(entry.get("ok"))
    if status == "error":
        return not entry.get("ok")
    return True


class RequestLog:
    def __init__(
        self,
        size: int = 500,
        *,
        redis_url: str | None = None,
        prefix: str = "moegw:",
        flush_interval_s: float = 1.0,
        clock: Any = time.time,
    ) -> None:
        if size < 1:
            raise ValueError("the request log needs room for at least one entry")
        self.size = size
        self._local: deque[LoggedAttempt] = deque(maxlen=size)
        self._unsent: deque[LoggedAttempt] = deque(maxlen=size)
        self._awaiting_usage: dict[str, LoggedAttempt] = {}
        self._redis_url = redis_url
        self._key = f"{prefix}requests"
        self._flush_interval_s = flush_interval_s
        self._clock = clock
        self._redis: Redis | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        return self._redis_url is not None

    # -- writes: called by the stats stores, synchronous, never raise ------------------------

    def attempt(self, attempt: Attempt) -> None:
        entry = LoggedAttempt(
            at=attempt.at if attempt.at is not None else self._clock(),
            route=attempt.route_id,
            ok=attempt.ok,
            error=attempt.error_kind,
            status=status_of(attempt),
            latency_ms=round(attempt.latency_s * 1000.0, 2),
            ttft_ms=None if attempt.ttft_s is None else round(attempt.ttft_s * 1000.0, 2),
            completion_tokens=attempt.completion_tokens,
        )
        self._local.appendleft(entry)
        if self._redis_url is not None:
            self._unsent.append(entry)
        # its usage, if any, comes next on this route (a failed stream segment has one too)
        self._awaiting_usage[attempt.route_id] = entry

    def usage(self, usage: Usage) -> None:
        entry = self._awaiting_usage.pop(usage.route_id, None)
        if entry is None:
            return
        entry.prompt_tokens = usage.prompt_tokens
        entry.completion_tokens = usage.completion_tokens
        entry.cost_usd = usage.cost_usd
        entry.client = usage.client_key

    # -- reads ---------------------------------------------------------------------------------

    async def recent(
        self, limit: int = 100, *, route: str | None = None, status: str = "all"
    ) -> dict[str, Any]:
        """{"entries": [...newest first], "shared": bool}; ValueError for a bad filter."""
        if status not in STATUS_FILTERS:
            raise ValueError(f"status must be one of {', '.join(STATUS_FILTERS)}")
        limit = max(1, min(limit, self.size))
        entries: list[dict[str, Any]] | None = None
        if self._redis_url is not None:
            try:
                entries = await self._read_shared()
            except StatsUnavailableError:
                entries = None
        shared = entries is not None
        if entries is None:
            entries = [asdict(e) for e in self._local]
        else:  # this process's newest, not pushed yet (their usage may still be on its way)
            entries = [asdict(e) for e in reversed(self._unsent)] + entries
        picked = [e for e in entries if _matches(e, route, status)][:limit]
        return {"entries": picked, "shared": shared}

    async def _read_shared(self) -> list[dict[str, Any]]:
        try:
            raw = await self._client().lrange(self._key, 0, self.size - 1)
        except Exception as exc:
            raise StatsUnavailableError("Redis is unreachable") from exc
        out = []
        for item in raw:
            with contextlib.suppress(ValueError, TypeError):
                data = json.loads(item)
                if isinstance(data, dict):
                    out.append(data)
        return out

    # -- background ----------------------------------------------------------------------------

    def _client(self) -> Redis:
        if self._redis is None:
            assert self._redis_url is not None
            self._redis = redis_client(self._redis_url)
        return self._redis

    async def start(self) -> None:
        if self._redis_url is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="request-log-flush")

    async def flush(self, *, settled_only: bool = True) -> None:
        """Push what is ready to the shared list (entries whose usage had time to arrive)."""
        if self._redis_url is None or not self._unsent:
            return
        cutoff = self._clock() - SETTLE_S if settled_only else float("inf")
        ready = []
        while self._unsent and self._unsent[0].at <= cutoff:
            ready.append(self._unsent.popleft())
        if not ready:
            return
        pipe = self._client().pipeline(transaction=False)
        pipe.lpush(self._key, *[e.to_json() for e in ready])
        pipe.ltrim(self._key, 0, self.size - 1)
        try:
            await pipe.execute()
        except Exception as exc:  # keep them for the next tick; the deque bounds the backlog
            self._unsent.extendleft(reversed(ready))
            log.debug("request log: Redis push failed: %s", type(exc).__name__)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            try:
                await self.flush()
            except Exception:
                log.exception("request log: flush failed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(settled_only=False), 2.0)
            await self._redis.aclose()
            self._redis = None
