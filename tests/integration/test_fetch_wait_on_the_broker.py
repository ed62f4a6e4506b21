"""Fetch waits on the real broker and Redis: an idle consumer polls once per idle interval, a
client's wake (through Redis) makes it fetch at once, workers follow the wake channel, and the
lag reader fetches nothing between reads."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from support.waiting import wait_for

from streams.kafka.fetch_wait import FetchWait, IdlePolicy, WakePublisher, follow_wakes, wake_channel
from streams.telemetry.lag import LagReader

pytestmark = pytest.mark.integration

IDLE_AFTER_S = 0.3
IDLE_POLL_MS = 3000


async def new_topic(settings, partitions: int = 2) -> str:
    topic = f"{settings.topic_prefix}.fetch-wait-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    return topic


async def test_an_idle_consumer_polls_once_per_interval_and_a_wake_fetches_at_once(settings):
    settings = settings.model_copy(update={"kafka_idle_after_s": IDLE_AFTER_S,
                                           "kafka_idle_fetch_max_wait_ms": IDLE_POLL_MS})
    topic = await new_topic(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    publisher = WakePublisher(settings)
    await consumer.start()
    await producer.start()
    tasks: list[asyncio.Task] = []
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in range(2)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        fetch_wait = FetchWait(consumer, idle=IdlePolicy.from_settings(settings))
        fetches: list[float] = []  # when each planned fetch was sent
        planned = consumer._fetcher._get_actions_per_node

        def counting(assignment):
            actions = planned(assignment)
            if actions[0]:
                fetches.append(time.monotonic())
            return actions

        consumer._fetcher._get_actions_per_node = counting
        received: dict[bytes, float] = {}

        async def read() -> None:
            while True:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        received[record.value] = time.monotonic()

        tasks.append(asyncio.create_task(read()))
        tasks.append(asyncio.create_task(follow_wakes(settings.redis_url, wake_channel(settings), fetch_wait.wake)))
        redis = aioredis.from_url(settings.redis_url)
        try:
            await wait_for(lambda: fetch_wait.state == "idle", timeout=10, what="the consumer going idle")
            polls = len(fetches)
            await wait_for(lambda: len(fetches) >= polls + 2, timeout=3 * IDLE_POLL_MS / 1000, what="two idle polls")
            # Idle polls come one interval apart (a 10 ms fetch each), not every 10 ms.
            assert fetches[-1] - fetches[-2] >= 0.8 * IDLE_POLL_MS / 1000
            assert (await redis.pubsub_numsub(wake_channel(settings)))[0][1] >= 1
            # Right after an idle poll: without a wake the record would wait ~3 s for the next.
            polls = len(fetches)
            await wait_for(lambda: len(fetches) > polls, timeout=2 * IDLE_POLL_MS / 1000, what="an idle poll")
            sent = time.monotonic()
            publisher.sending()
            await producer.send_and_wait(topic, b"woken", partition=1)
            await wait_for(lambda: b"woken" in received, timeout=IDLE_POLL_MS / 1000, what="the woken fetch")
            assert received[b"woken"] - sent < 0.5 * IDLE_POLL_MS / 1000
            assert publisher.published == 1
        finally:
            await redis.aclose()
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await publisher.close()
        await producer.stop()
        await consumer.stop()


async def test_the_worker_follows_the_wake_channel(start_worker, settings):
    worker = start_worker()
    redis = aioredis.from_url(settings.redis_url)
    try:
        async def subscribers() -> int:
            worker.check_running()
            return (await redis.pubsub_numsub(wake_channel(settings)))[0][1]

        await wait_for(subscribers, timeout=90, interval=0.2, what="the worker subscribed to its wake channel")
    finally:
        await redis.aclose()


async def test_the_lag_reader_fetches_nothing_between_reads(topics_ready):
    reader = LagReader(topics_ready)
    await reader.start()
    try:
        lags = await reader.read()
        assert lags
        consumer = reader._consumer
        assert consumer is not None
        assert consumer.assignment() and consumer.paused() == consumer.assignment()
        await reader.read()  # a second read assigns (and reads) again
        assert consumer.paused() == consumer.assignment()
    finally:
        await reader.stop()
