"""The records a topic holds, read back by the test."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from streams.kafka.offsets import fixed_ends
from streams.settings import Settings

FETCH_BYTES = 16 * 1024 * 1024  # events of a few MB come back whole


async def topic_records(settings: Settings, topic: str, timeout: float = 60.0) -> list[ConsumerRecord]:
    """Every record on `topic` now: each partition read from its start to its end offset as it
    is when called (no waiting for records to stop coming)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
                                max_partition_fetch_bytes=FETCH_BYTES, fetch_max_bytes=FETCH_BYTES)
    await consumer.start()
    try:
        await consumer.topics()  # the metadata of every topic, one created just now too
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        ends = await fixed_ends(consumer, tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord] = []
        async with asyncio.timeout(timeout):
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                for tp, batch in (await consumer.getmany(timeout_ms=500)).items():
                    records += [r for r in batch if r.offset < ends[tp]]
        return records
    finally:
        await consumer.stop()
