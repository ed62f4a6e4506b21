"""The stores a command reads or writes (results, registry, API keys, tenant limits), on
connections opened for the command and closed after it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from streams.cli.common import get_settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from streams.gate.auth import ApiKeyStore
    from streams.gate.ratelimit import TenantLimits
    from streams.registry.store import RegistryStore
    from streams.settings import Settings
    from streams.storage.results import ResultsStore

T = TypeVar("T")


@dataclass(frozen=True)
class Stores:
    """PostgreSQL (through the results store's pool) and Redis, for the stores built on them."""

    settings: Settings
    results: ResultsStore
    redis: aioredis.Redis

    def registry(self) -> RegistryStore:
        from streams.registry.store import RegistryStore

        return RegistryStore(self.settings, self.results.pool, self.redis)

    def keys(self) -> ApiKeyStore:
        from streams.gate.auth import ApiKeyStore

        return ApiKeyStore(self.results.pool, self.redis, self.settings.api_key_pepper,
                           self.settings.api_key_cache_ttl_s, key_prefix=self.settings.topic_prefix)

    def limits(self) -> TenantLimits:
        from streams.gate.ratelimit import TenantLimits

        return TenantLimits(self.results.pool, self.redis, self.settings.api_key_cache_ttl_s,
                            key_prefix=self.settings.topic_prefix)


def with_stores(use: Callable[[Stores], Awaitable[T]]) -> T:
    """`use(stores)` on fresh connections (the schema created or migrated first), closed after."""
    from streams.storage.redis import redis_client
    from streams.storage.results import ResultsStore
    from streams.storage.schema import migrate

    async def opened() -> T:
        settings = get_settings()
        await migrate(settings.postgres_dsn)
        async with ResultsStore(settings.postgres_dsn) as results:
            redis = redis_client(settings.redis_url)
            try:
                return await use(Stores(settings, results, redis))
            finally:
                await redis.aclose()

    return asyncio.run(opened())
