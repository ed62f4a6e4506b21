"""The Redis client of a process's stores (rate limits, caches, heartbeats)."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def redis_client(url: str) -> aioredis.Redis:
    """Fails fast when Redis is down (redis-py's default retries take seconds), and waits for a
    free connection rather than failing when a burst of checks outnumbers the pool."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=2.0, socket_timeout=1.0, socket_connect_timeout=1.0,
    )
    return aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 1))
