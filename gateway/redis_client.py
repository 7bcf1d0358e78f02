"""The asyncio Redis clients of the price book, the request log and the client quotas.

    client = redis_client(settings.redis_url)             # connect/read bounded: 2 s
    client = redis_client(settings.redis_url, timeout_s=1.0)

Every client the gateway makes has bounded connect and read times: a Redis that stops answering
(a paused process, a dropped route) rather than refusing must cost a caller at most `timeout_s`,
never hang it. (The stats store makes its own, with its retry policy: stats/redis_store.py.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis


def redis_client(url: str, timeout_s: float = 2.0) -> Redis:
    from redis.asyncio import Redis

    return Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
