"""Where a step's events go: record batches per topic partition, sent as they fill and confirmed
together before the step's input is acknowledged (at-least-once).

Each put record joins its partition's open batch, the partition chosen as the producer's own
partitioner would for the key (a key keeps its partition; records without a key join the batch
already open on the topic, or a partition the partitioner picks). A batch that fills is sent at
once and a new one opened; `flush` sends the rest and returns only when the broker confirmed every
batch, raising if any send failed (the agent then retries the whole chunk, `agents.common.run_step`).

One producer request per partition and chunk instead of a `send` per record: Faust's and
aiokafka's per-record send path cost ~175 µs of CPU per message on the local broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from faust.exceptions import ProducerSendError

Headers = list[tuple[str, bytes]]
Record = tuple[str, bytes | None, bytes, Headers | None]  # topic, key, value, headers
Partitioner = Callable[[str, bytes | None], int]  # (topic, key) → partition


class Batch(Protocol):
    """What the grouping needs of a record batch (aiokafka's `BatchBuilder`)."""

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes | None,
               headers: Headers) -> object | None: ...

    def close(self) -> None: ...


Sendable = tuple[str, int, Batch]  # topic, partition, closed batch


class Batches:
    """Records grouped into batches per (topic, partition), in the order they come. No I/O."""

    def __init__(self, partition_of: Partitioner, new_batch: Callable[[], Batch]) -> None:
        self._partition_of = partition_of
        self._new_batch = new_batch
        self._open: dict[tuple[str, int], Batch] = {}
        self._unkeyed: dict[str, int] = {}  # where a topic's records without a key go

    def add(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> Sendable | None:
        """Add a record; the batch it filled (closed, to be sent before the new one), or None."""
        if key is not None:
            partition = self._partition_of(topic, key)
        elif (partition := self._unkeyed.get(topic, -1)) < 0:
            open_here = [p for t, p in self._open if t == topic]
            partition = self._unkeyed[topic] = open_here[0] if open_here else self._partition_of(topic, None)
        headers = headers or []
        batch = self._open.get((topic, partition))
        if batch is None:
            batch = self._open[(topic, partition)] = self._new_batch()
        if batch.append(timestamp=None, key=key, value=value, headers=headers) is not None:
            return None
        batch.close()
        fresh = self._open[(topic, partition)] = self._new_batch()
        if fresh.append(timestamp=None, key=key, value=value, headers=headers) is None:
            raise ValueError(f"a record of {len(value)} bytes does not fit an empty batch")
        return topic, partition, batch

    def drain(self) -> list[Sendable]:
        """The open batches, closed, in the order they were opened; none is left open."""
        out = [(topic, partition, batch) for (topic, partition), batch in self._open.items()]
        for _, _, batch in out:
            batch.close()
        self._open.clear()
        self._unkeyed.clear()
        return out


def group(records: Iterable[Record], partition_of: Partitioner, new_batch: Callable[[], Batch]) -> list[Sendable]:
    """The batches `records` make, in the order an outbox sends them."""
    batches = Batches(partition_of, new_batch)
    full = [sent for record in records if (sent := batches.add(*record)) is not None]
    return full + batches.drain()


class Outbox:
    """Batches a step's records on an aiokafka producer (Faust's, `agents.common.outbox`);
    `flush` waits until the broker confirmed every batch."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self._batches = Batches(self._partition, producer.create_batch)
        self._known: set[str] = set()  # topics whose partitions the producer knows
        self._pending: list[asyncio.Future[Any]] = []

    async def put(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> None:
        # What the producer's `send` refuses before sending, refused the same way (Faust wraps it in
        # ProducerSendError: a failure of the step, not an outage; `streams.worker.failures`).
        try:
            if topic not in self._known:
                await self._producer.partitions_for(topic)  # waits for the topic's metadata
                self._known.add(topic)
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers or [])
            if size > self._producer._max_request_size:
                raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized, more than the "
                                               f"producer's max_request_size")
        except KafkaError as exc:
            raise ProducerSendError(f"Error while sending: {exc!r}") from exc
        full = self._batches.add(topic, key, value, headers)
        if full is not None:
            await self._send(*full)

    async def flush(self) -> None:
        """Send the open batches and wait until every batch of this outbox is confirmed; raises the
        first failure. The outbox is empty afterwards, whatever happened."""
        sendable = self._batches.drain()
        try:
            for topic, partition, batch in sendable:
                await self._send(topic, partition, batch)
        finally:
            pending, self._pending = self._pending, []
        await asyncio.gather(*pending)

    def _partition(self, topic: str, key: bytes | None) -> int:
        # The producer's own choice for a key (what `send(key=...)` does; Faust's `key_partition`).
        partition: int = self._producer._partition(topic, None, None, None, key, None)
        return partition

    async def _send(self, topic: str, partition: int, batch: Batch) -> None:
        future: asyncio.Future[Any] = await self._producer.send_batch(batch, topic, partition=partition)
        # A failure is raised by `flush`; one that nothing awaits any more (the step failed before)
        # is not reported again as never retrieved.
        future.add_done_callback(_retrieve)
        self._pending.append(future)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
