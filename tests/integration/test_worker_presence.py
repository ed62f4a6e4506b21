"""Heartbeats and model statistics on the real Redis (127.0.0.1:6379): what workers write and
the bridge reads, expiry, withdrawal, several workers summed, and Redis going away."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from support.waiting import assert_stays, wait_for

from streams.settings import Settings
from streams.storage.redis import redis_client
from streams.telemetry.model_stats import ModelStats, read
from streams.telemetry.presence import Heartbeat, index_key, live_workers, served

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis():
    client = redis_client("redis://127.0.0.1:6379/0")
    yield client
    await client.aclose()


@pytest.fixture
def settings() -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(topic_prefix=f"t{tag}", app_id=f"app-{tag}", heartbeat_interval_s=0.2)


async def test_a_heartbeat_names_what_the_worker_serves_until_withdrawn_or_expired(redis, settings):
    serving: list[str] | None = None
    first = Heartbeat(settings, lambda: serving, ModelStats(), worker="a", redis=redis_client(settings.redis_url))
    second = Heartbeat(settings, lambda: ["tiny/2"], ModelStats(), worker="b", redis=redis_client(settings.redis_url))
    group = settings.topic_prefix, settings.app_id

    await first.beat()  # cannot serve yet: nothing written
    assert await live_workers(redis, *group) == [] and not first.published
    serving = ["tiny/1"]
    await first.beat()
    await second.beat()
    beats = await live_workers(redis, *group)
    assert [b.worker for b in beats] == ["a", "b"] and served(beats) == {"tiny/1", "tiny/2"}
    assert beats[0].group == settings.app_id and beats[0].models == ["tiny/1"]

    serving = None  # stopping: the next beat withdraws
    await first.beat()
    assert [b.worker for b in await live_workers(redis, *group)] == ["b"]

    # b stopped beating: its heartbeat expires after three intervals (0.6 s).
    await wait_for(lambda: live_workers(redis, *group), timeout=5, until=lambda beats: beats == [],
                   what="b's heartbeat expired")
    assert await redis.scard(index_key(*group)) == 0  # the reader pruned the index
    await first.close()
    await second.close()


async def test_statistics_of_several_workers_are_summed(redis, settings):
    one, two = ModelStats(), ModelStats()
    one.success("tiny", "1", rows=2, total_ms=4, compute_ms=1, now_ms=2_000)
    two.success("tiny", "1", rows=3, total_ms=6, compute_ms=2, now_ms=1_000)
    two.execution("tiny", "1", batch_size=2, compute_s=0.002)
    two.failure("tiny", "1", total_ms=1)
    assert await one.flush(redis, settings.topic_prefix) and await two.flush(redis, settings.topic_prefix)
    assert one.pending() == {} and two.pending() == {}
    (entry, empty) = await read(redis, settings.topic_prefix, [("tiny", "1"), ("tiny", "2")])
    assert entry["inference_count"] == 5 and entry["last_inference"] == 2_000 and entry["execution_count"] == 1
    assert entry["inference_stats"]["success"] == {"count": 2, "ns": 10_000_000}
    assert entry["inference_stats"]["fail"] == {"count": 1, "ns": 1_000_000}
    assert entry["batch_stats"][0]["compute_infer"] == {"count": 1, "ns": 2_000_000}
    assert empty["inference_count"] == 0 and empty["version"] == "2"


async def test_redis_down_fails_no_beat_and_loses_no_count(settings, caplog):
    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    stats = ModelStats()
    stats.success("tiny", "1", rows=1, total_ms=2, compute_ms=1, now_ms=5)
    heartbeat = Heartbeat(dead, lambda: ["tiny/1"], stats, worker="w")
    await asyncio.wait_for(heartbeat.beat(), 10)  # returns: nothing raised
    await asyncio.wait_for(heartbeat.beat(), 10)
    assert heartbeat.unavailable_count == 2 and stats.unavailable_count == 2
    assert stats.pending()[("tiny", "1")]["success_count"] == 1  # kept for when Redis is back
    assert sum("heartbeat not written" in r.message for r in caplog.records) == 1  # once per outage
    await asyncio.wait_for(heartbeat.close(), 10)


async def test_the_heartbeat_follows_what_the_worker_serves_within_a_tick(redis, settings):
    slow = settings.model_copy(update={"heartbeat_interval_s": 10.0})  # a change must not wait for it
    serving: list[str] | None = None
    heartbeat = Heartbeat(slow, lambda: serving, ModelStats(), worker="w", redis=redis_client(slow.redis_url))
    group = slow.topic_prefix, slow.app_id
    task = asyncio.create_task(heartbeat.run())

    async def listed() -> set[str] | None:
        beats = await live_workers(redis, *group)
        return served(beats) if beats else None

    async def follows(expected: set[str] | None) -> None:
        # Well under the 10 s interval: the change is published within a tick or two.
        await wait_for(listed, timeout=5, interval=0.1, until=lambda now: now == expected,
                       what=f"heartbeat listing {expected}")

    try:
        async def unlisted() -> bool:
            return await listed() is None

        await assert_stays(unlisted, for_s=0.3, what="nothing listed while nothing is served")  # the first beats
        serving = ["tiny/1"]
        await follows({"tiny/1"})
        serving = ["tiny/1", "tiny/2"]
        await follows({"tiny/1", "tiny/2"})
        serving = None
        await follows(None)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await heartbeat.close()
