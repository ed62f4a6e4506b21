"""The outbox (`streams.kafka.outbox`): records grouped into aiokafka record batches per topic partition
as the producer's partitioner places them, full batches split, headers kept; `flush` returns only
once every batch is confirmed and raises when one failed. Real aiokafka batch builders, a fake
producer, no broker; nothing timed (each wait is bounded)."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from faust.exceptions import ProducerSendError

from streams.kafka.outbox import Batches, Outbox, Record, group

BOUND_S = 10.0
PARTITIONS = 4


def new_batch(size: int = 16 * 1024) -> BatchBuilder:
    return BatchBuilder(size, 0, is_transactional=False)


def by_key(topic: str, key: bytes | None) -> int:
    """A stand-in partitioner: a key's CRC (stable); without a key, always partition 3."""
    return 3 if key is None else zlib.crc32(key) % PARTITIONS


def contents(batch: Any) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    return [(r.key, r.value, list(r.headers)) for r in DefaultRecordBatch(bytearray(batch._build()))]


def test_records_go_to_their_keys_partitions_in_order_with_their_headers() -> None:
    records: list[Record] = [("a", f"k{i % 7}".encode(), f"v{i}".encode(), [("h", str(i).encode())])
                             for i in range(50)]
    records.append(("b", b"k1", b"other topic", None))
    sent = group(records, by_key, new_batch)
    assert len({(topic, partition) for topic, partition, _ in sent}) == len(sent)  # one batch each
    for topic, partition, batch in sent:
        expected = [(key, value, headers or []) for t, key, value, headers in records
                    if t == topic and by_key(t, key) == partition]
        assert contents(batch) == expected


def test_a_full_batch_is_sent_and_the_partition_goes_on_in_a_new_one() -> None:
    records: list[Record] = [("a", b"same", bytes([i]) * 300, [("n", bytes([i]))]) for i in range(40)]
    sent = group(records, by_key, lambda: new_batch(2048))
    assert len(sent) > 1
    assert {(topic, partition) for topic, partition, _ in sent} == {("a", by_key("a", b"same"))}
    assert [record for _, _, batch in sent for record in contents(batch)] == [
        (key, value, headers) for _, key, value, headers in records]
    assert all(batch.size() <= 2048 for _, _, batch in sent)


def test_a_record_bigger_than_a_batch_goes_alone() -> None:
    records: list[Record] = [("a", b"k", b"small", None), ("a", b"k", b"x" * 5000, None), ("a", b"k", b"tail", None)]
    sent = group(records, by_key, lambda: new_batch(1024))
    assert [[value for _, value, _ in contents(batch)] for _, _, batch in sent] == [
        [b"small"], [b"x" * 5000], [b"tail"]]


def test_records_without_a_key_join_a_batch_already_open_on_their_topic() -> None:
    asked: list[tuple[str, bytes | None]] = []

    def partitioner(topic: str, key: bytes | None) -> int:
        asked.append((topic, key))
        return by_key(topic, key)

    records: list[Record] = [("a", b"k2", b"1", None), ("a", None, b"2", None), ("a", None, b"3", None),
                             ("b", None, b"4", None), ("b", None, b"5", None)]
    sent = group(records, partitioner, new_batch)
    assert [(topic, partition, [v for _, v, _ in contents(batch)]) for topic, partition, batch in sent] == [
        ("a", by_key("a", b"k2"), [b"1", b"2", b"3"]), ("b", 3, [b"4", b"5"])]
    assert asked == [("a", b"k2"), ("b", None)]  # the partitioner picks once per topic


def test_drained_batches_are_closed_and_nothing_stays_open() -> None:
    batches = Batches(by_key, new_batch)
    assert batches.add("a", b"k", b"v") is None
    [(_, _, batch)] = batches.drain()
    assert batch.append(timestamp=None, key=b"k", value=b"late", headers=[]) is None  # closed
    assert batches.drain() == []


# -- the outbox on a producer -----------------------------------------------------------------


class Producer:
    """What the outbox uses of aiokafka's producer; each sent batch's future is settled by the test."""

    _max_request_size = 10_000

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, asyncio.Future[Any]]] = []
        self.metadata_waits: list[str] = []

    async def partitions_for(self, topic: str) -> set[int]:
        self.metadata_waits.append(topic)
        return set(range(PARTITIONS))

    def _partition(self, topic: str, partition: None, key: None, value: None, serialized_key: bytes | None,
                   serialized_value: None) -> int:
        return by_key(topic, serialized_key)

    def create_batch(self) -> BatchBuilder:
        return new_batch(1024)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self.sent.append((topic, partition, future))
        return future


async def test_flush_returns_only_when_every_batch_is_confirmed() -> None:
    producer = Producer()
    box = Outbox(producer)
    for i in range(30):
        await box.put("a", f"k{i}".encode(), b"v" * 300, [("i", str(i).encode())])
    early = len(producer.sent)
    assert early > 0  # batches that filled went out during the puts
    flushing = asyncio.ensure_future(box.flush())
    await asyncio.sleep(0)
    assert len(producer.sent) > early and not flushing.done()
    for _, _, future in producer.sent[:-1]:
        future.set_result(None)
    await asyncio.sleep(0)
    assert not flushing.done()  # one batch is not confirmed yet
    producer.sent[-1][2].set_result(None)
    await asyncio.wait_for(flushing, BOUND_S)
    assert producer.metadata_waits == ["a"]


async def test_flush_raises_when_a_batch_failed_and_the_outbox_is_empty_after() -> None:
    producer = Producer()
    box = Outbox(producer)
    await box.put("a", b"k1", b"v")
    await box.put("b", b"k2", b"v")
    flushing = asyncio.ensure_future(box.flush())
    await asyncio.sleep(0)
    (_, _, first), (_, _, second) = producer.sent
    first.set_result(None)
    second.set_exception(ConnectionError("broker gone"))
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(flushing, BOUND_S)
    sent = len(producer.sent)
    await asyncio.wait_for(box.flush(), BOUND_S)  # nothing left to send or to wait for
    assert len(producer.sent) == sent


async def test_a_record_the_producer_would_refuse_is_refused_like_its_send_does() -> None:
    box = Outbox(Producer())
    with pytest.raises(ProducerSendError, match="MessageSizeTooLarge"):
        await box.put("a", b"k", b"x" * 20_000)
