"""Partition offsets as the local broker reports them."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition


async def fixed_ends(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    """Each partition's end offset now. Taken from a fetch's high watermark as well: the local
    broker (Tansu) answers ListOffsets(latest) with a lower offset once a batch holds several
    records. Leaves the partitions assigned."""
    listed = await consumer.end_offsets(tps)
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, listed[tp])
    await consumer.getmany(timeout_ms=1000, max_records=1)
    return {tp: max(listed[tp], consumer.highwater(tp) or 0) for tp in tps}
