"""Lifecycles alike: the objects a process starts and stops (stores, readers, followers, the
client, the gatekeeper) take start() and stop() twice without harm, on the real services."""

from __future__ import annotations

import asyncio

import pytest

from streams.client import InferenceClient
from streams.gate.gatekeeper import Gatekeeper
from streams.registry.records import ModelRegistry
from streams.registry.store import RegistryFollower
from streams.settings import Settings
from streams.storage.results import ResultsStore
from streams.storage.schema import migrate
from streams.telemetry.lag import LagReader

pytestmark = pytest.mark.integration


async def test_results_store_starts_once_and_stops_twice(settings: Settings):
    store = ResultsStore(settings.postgres_dsn)
    await store.start()
    pool = store.pool
    await store.start()
    assert store.pool is pool  # no second pool
    await store.stop()
    await store.stop()
    async with ResultsStore(settings.postgres_dsn) as again:
        assert await again.pool.fetchval("SELECT 1") == 1


async def test_kafka_readers_and_the_client_start_once_and_stop_twice(topics_ready: Settings):
    settings = topics_ready
    follower = RegistryFollower(settings, ModelRegistry())
    reader = LagReader(settings)
    client = InferenceClient(settings)
    for service in (follower, reader, client):
        before = asyncio.all_tasks()
        await service.start()
        await service.start()
        await service.stop()
        await service.stop()
        await asyncio.sleep(0)  # let cancelled tasks finish
        left = [t for t in asyncio.all_tasks() - before if not t.done()]
        assert not left, f"{type(service).__name__} left tasks running: {left}"
    async with LagReader(settings) as lag:
        assert isinstance(await lag.read(), list)


async def test_gatekeeper_starts_once_and_stops_twice(settings: Settings):
    await migrate(settings.postgres_dsn)
    async with ResultsStore(settings.postgres_dsn) as store:
        gatekeeper = Gatekeeper(settings)
        await gatekeeper.start(store.pool)
        limits = gatekeeper.tenant_limits
        await gatekeeper.start(store.pool)
        assert gatekeeper.tenant_limits is limits
        await gatekeeper.stop()
        await gatekeeper.stop()
