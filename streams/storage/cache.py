"""A Redis read-through cache of rows whose source of truth is PostgreSQL (API keys, tenant
limits, the registry).

A lookup reads Redis, else loads the value and fills the entry only where none is (SET NX); a
change overwrites the entry (`put`) or deletes it (`invalidate`). So a lookup that read the row
just before a change can never put the old value back over a `put`.

Redis down: a lookup loads from PostgreSQL (logged) and leaves the cache alone, so reads go on;
`put` and `invalidate` raise, since a cached copy may then serve for up to the TTL and the
caller must say so.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ReadThroughCache(Generic[T]):
    """Values under `<namespace>:<name>`, each kept for `ttl_s` (or `ttl_of(value)`) seconds.
    `decode` gets bytes or str, as the Redis client decodes."""

    redis: aioredis.Redis
    namespace: str
    ttl_s: float
    encode: Callable[[T], bytes]
    decode: Callable[[bytes | str], T]
    ttl_of: Callable[[T], float] | None = None

    def key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    async def get(self, name: str, load: Callable[[], Awaitable[T]]) -> T:
        key = self.key(name)
        try:
            cached = await self.redis.get(key)
        except RedisError as exc:
            log.warning("cache %s unavailable, reading PostgreSQL: %s", self.namespace, exc)
            return await load()
        if cached is not None:
            return self.decode(cached)
        value = await load()
        try:
            await self.redis.set(key, self.encode(value), px=self._ttl_ms(value), nx=True)
        except RedisError as exc:
            log.warning("cache %s unavailable: %s", self.namespace, exc)
        return value

    async def put(self, name: str, value: T) -> None:
        """Replace the entry with a changed value; raises RedisError when Redis cannot take it."""
        await self.redis.set(self.key(name), self.encode(value), px=self._ttl_ms(value))

    async def invalidate(self, name: str) -> None:
        """Drop the entry after a change; raises RedisError when Redis cannot take it."""
        await self.redis.delete(self.key(name))

    def _ttl_ms(self, value: T) -> int:
        return int((self.ttl_s if self.ttl_of is None else self.ttl_of(value)) * 1000)
