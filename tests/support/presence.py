"""What the live workers serve, as their heartbeats in Redis say (what the bridge's readiness reads)."""

from __future__ import annotations

from streams.settings import Settings
from streams.storage.redis import redis_client
from streams.telemetry.presence import live_workers, served
from support.waiting import wait_for


async def wait_until_served(settings: Settings, *versions: str, timeout: float = 60.0) -> None:
    """Until live workers of the settings' group serve every "name/version" given: a registry
    change has reached them (they follow the registry topic) and the versions are loaded."""
    redis = redis_client(settings.redis_url)
    try:
        async def serving() -> bool:
            return set(versions) <= served(await live_workers(redis, settings.topic_prefix, settings.app_id))

        await wait_for(serving, timeout=timeout, interval=0.1, what=f"workers serving {', '.join(versions)}")
    finally:
        await redis.aclose()


async def wait_until_live(settings: Settings, pids: list[int], timeout: float = 60.0) -> None:
    """Until each of the worker processes `pids` of the settings' group has a live heartbeat (it
    has started: its consumer, presence and agents run)."""
    redis = redis_client(settings.redis_url)
    try:
        async def live() -> bool:
            return set(pids) <= {beat.pid for beat in await live_workers(redis, settings.topic_prefix, settings.app_id)}

        await wait_for(live, timeout=timeout, interval=0.1, what=f"heartbeats of workers {pids}")
    finally:
        await redis.aclose()
