"""The Redis store's I/O: one background round trip per tick, start-up, flush and close.

`RedisStats` (redis_store.py) keeps the records, the snapshot and the health it builds; this
mixin owns the wire: sealing the buffer into a batch (redis_batch.py), sending it with the
reads in one pipeline, and what each reply means (applied, duplicate, NOSCRIPT, a refused
batch, a counter that would overflow, Redis unreachable). See redis_store.py's module doc for
the protocol and its guarantees (nothing lost, nothing applied twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from gateway.stats.base import StatsOptions
from gateway.stats.metrics import StatsMetrics
from gateway.stats.pending import PendingDeltas
from gateway.stats.redis_batch import (
    APPLY_BATCH_LUA,
    APPLY_BATCH_SHA,
    KeySpace,
    SealedBatch,
    overflowing_increment,
    seal,
    without_increment,
)
from gateway.stats.snapshot import ReadPlan, ReadScope, Snapshot

logger = logging.getLogger("gateway.stats")
_IO_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
GIVE_UP_REJECTED_S = 60.0


class RedisSync:
    """The background channel of RedisStats (the attributes below are set by its __init__)."""

    options: StatsOptions
    metrics: StatsMetrics
    writer_id: str
    _clock: Callable[[], float]
    _redis: aioredis.Redis
    _keys: KeySpace
    _seq: int
    _pending: PendingDeltas
    _sealed: SealedBatch | None
    _snapshot: Snapshot
    _lock: asyncio.Lock
    _task: asyncio.Task[None] | None
    _send_script_body: bool
    _rejected_since: float | None
    _connected: bool

    @property
    def pending(self) -> int:
        raise NotImplementedError

    def _forget(self, routes: Iterable[str]) -> None:
        raise NotImplementedError

    def _absorb(self, plan: ReadPlan, replies: list[Any], now: float) -> bool:
        raise NotImplementedError

    # -- background ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads a first snapshot (bounded wait: a dead Redis must not hold up start-up), then
        starts the background task."""
        if self._task is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.socket_timeout_s):
                    await self.refresh()
            self._task = asyncio.create_task(self._run(), name="stats-flush")

    async def flush(self) -> None:
        for _ in range(4):  # records may keep arriving; a bounded number of rounds suffices
            if not self.pending:
                return
            if not await self._tick("touched"):
                return

    async def refresh(self) -> None:
        await self._tick("full", complete=True)

    async def ping(self) -> bool:
        for attempt in range(2):  # the first use of a pooled connection may find it stale
            try:
                ok = bool(await self._redis.ping())
            except _IO_ERRORS as exc:
                self._mark(False, exc)
                if attempt:
                    return False
            else:
                self._mark(True)
                return ok
        return False

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.close_timeout_s):
                while True:
                    await self.flush()
                    if not self.pending:
                        break
                    await asyncio.sleep(min(0.2, self.options.flush_interval_s))
        if self.pending:
            logger.warning("stats: closing with %d records not persisted", self.pending)
        await self._redis.aclose()

    async def _run(self) -> None:
        period = self.options.flush_interval_s
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self.options.refresh_interval_s
        next_full = loop.time() + self.options.full_refresh_s
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            scope: ReadScope = "touched"
            if now >= next_full:
                scope = "full"
            elif now >= next_refresh:
                scope = "recent"
            try:
                ok = await self._tick(scope)
            except Exception:  # keep the side channel alive whatever happens
                logger.exception("stats: flush tick failed")
                continue
            if ok and scope != "touched":
                next_refresh = now + self.options.refresh_interval_s
                if scope == "full":
                    next_full = now + self.options.full_refresh_s

    async def _tick(self, scope: ReadScope, *, complete: bool = False) -> bool:
        """One round trip: send the batch, sealing the buffer if none is in flight, and read
        back. False when Redis did not answer twice in a row (one immediate retry: after a
        Redis restart the first use of a pooled connection fails). Never raises on I/O errors.
        complete: read again when the read named routes this process did not know."""
        async with self._lock:
            errors = 0
            for _ in range(4):
                outcome = await self._tick_locked(scope)
                if outcome == "rejected":
                    return False
                if outcome == "error":
                    errors += 1
                    if errors == 2:
                        return False
                elif outcome == "ok" or (outcome == "learned" and not complete):
                    return True
            return True

    async def _tick_locked(self, scope: ReadScope) -> str:
        now = self._clock()
        if self._sealed is None and not self._pending.empty:
            self._seq += 1
            self._sealed = seal(
                self._pending,
                space=self._keys,
                writer_id=self.writer_id,
                seq=self._seq,
                writer_ttl_s=self.options.writer_ttl_s,
                usage_ttl_days=self.options.usage_ttl_days,
                now=now,
            )
            self._pending = PendingDeltas()
            # the sum of the overlays is unchanged, but be safe: their routes are rebuilt
            self._forget(self._sealed.deltas.circuits)
        batch = self._sealed
        plan = self._snapshot.plan(batch.deltas.touched() if batch else {}, scope, now)
        if batch is None and plan.empty:
            return "ok"
        pipe = self._redis.pipeline(transaction=False)
        if batch is not None:
            if self._send_script_body:  # after NOSCRIPT (a restarted Redis): EVAL caches it
                pipe.eval(APPLY_BATCH_LUA, len(batch.keys), *batch.keys, *batch.args)
            else:
                pipe.evalsha(APPLY_BATCH_SHA, len(batch.keys), *batch.keys, *batch.args)
        self._snapshot.queue_reads(pipe, plan)
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        except _IO_ERRORS as exc:
            self._mark(False, exc)
            self.metrics.flushes.labels("error").inc()
            return "error"
        self._mark(True)
        if batch is not None:
            reply = replies.pop(0)
            if isinstance(reply, NoScriptError):  # nothing ran, the reads are stale: redo
                self._send_script_body = True
                return "noscript"
            self._send_script_body = False
            overflow = overflowing_increment(reply) if isinstance(reply, Exception) else None
            if overflow is not None:  # nothing applied: resend at once without that increment
                logger.error(
                    "stats: batch %d: counter full, increment dropped: %s", batch.seq, reply
                )
                self.metrics.batch_increments_dropped.inc()
                self._sealed = without_increment(batch, *overflow)
                return "resend"  # like NOSCRIPT: nothing ran, the reads are redone with it
            if isinstance(reply, Exception):
                self.metrics.flushes.labels("rejected").inc()
                if self._rejected_since is None:
                    self._rejected_since = now
                if now - self._rejected_since < GIVE_UP_REJECTED_S:
                    logger.warning("stats: batch %d rejected, will retry: %s", batch.seq, reply)
                    self._absorb(plan, replies, now)
                    return "rejected"
                logger.error("stats: batch %d rejected for a minute, dropped: %s", batch.seq, reply)
            else:
                self.metrics.flushes.labels("ok" if reply == 1 else "duplicate").inc()
            self._rejected_since = None
            self._sealed = None
        learned = self._absorb(plan, replies, now)
        return "learned" if learned else "ok"

    def _mark(self, connected: bool, error: BaseException | None = None) -> None:
        if connected != self._connected:
            if connected:
                logger.info("stats: Redis reachable; %d records pending", self.pending)
            else:
                logger.warning(
                    "stats: Redis unreachable (%s); %d records pending locally",
                    type(error).__name__,
                    self.pending,
                )
        self._connected = connected
