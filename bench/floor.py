"""The Kafka floor: a plain aiokafka echo service through the same broker, with the pipeline's
message sizes, so a pipeline's throughput reads against what Kafka itself allows in the same run.

    python -m bench.floor serve --bootstrap HOST:PORT --topic T --reply-topic R --reply-bytes N
        --group G [--fetch-wait-ms 10]

The service (its own process, like the worker) consumes chunks from a topic, produces one reply
of `--reply-bytes` per record to the reply topic (keyed by the request's key), awaits the
broker's acknowledgements, then commits the chunk's offsets: at-least-once, as the worker does,
with the worker's client settings (fetch wait, fetch sizes, linger, acks=all, session timeout).
`FloorClient` is the client side: N requests of the pipeline's request size sent back to back
from one producer, timed to the last reply on the reply topic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.local.harness import Service
from streams.kafka.fetch_wait import wait_longer_when_behind
from streams.settings import Settings
from streams.worker.app import (
    LINGER_S,
    MAX_BATCH_BYTES,
    MAX_FETCH_BYTES,
    MAX_POLL_RECORDS,
    heartbeat_interval_s,
)

# The worker's consumer and producer settings, so only the pipeline differs.
LINGER_MS = int(LINGER_S * 1000)
DEFAULTS = Settings()
SESSION_TIMEOUT_MS = int(DEFAULTS.kafka_session_timeout_s * 1000)
HEARTBEAT_MS = int(heartbeat_interval_s(DEFAULTS) * 1000)
YIELD_EVERY = 64  # as bench.e2e's burst
READY_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 3.0


def ratio(pipeline_req_s: float, floor_req_s: float | None) -> float | None:
    """Pipeline throughput over the floor's; None without a floor figure."""
    if not floor_req_s:
        return None
    return pipeline_req_s / floor_req_s


# -- the echo service -------------------------------------------------------------------------


async def serve(bootstrap: str, topic: str, reply_topic: str, reply_bytes: int, group: str,
                fetch_wait_ms: int, max_message_bytes: int) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=fetch_wait_ms,
        max_poll_records=MAX_POLL_RECORDS, fetch_max_bytes=MAX_FETCH_BYTES,
        max_partition_fetch_bytes=MAX_FETCH_BYTES, session_timeout_ms=SESSION_TIMEOUT_MS,
        heartbeat_interval_ms=HEARTBEAT_MS,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=LINGER_MS, acks="all",
        max_batch_size=MAX_BATCH_BYTES, max_request_size=max_message_bytes + 64 * 1024,
    )
    await producer.start()
    await consumer.start()
    wait_longer_when_behind(consumer)
    reply = b"r" * reply_bytes
    print("echo service started", flush=True)
    try:
        while not stopping.is_set():
            chunks = await consumer.getmany(timeout_ms=200, max_records=MAX_POLL_RECORDS)
            if not chunks:
                continue
            deliveries = [await producer.send(reply_topic, reply, key=record.key)
                          for records in chunks.values() for record in records]
            await asyncio.gather(*deliveries)  # acknowledged by the broker, then committed
            await consumer.commit({tp: records[-1].offset + 1 for tp, records in chunks.items()})
    finally:
        await consumer.stop()
        await producer.stop()


class EchoService(Service):
    """`python -m bench.floor serve` as a process, stopped by its PID."""

    command = "echo service"

    def __init__(self, settings: Settings, topic: str, reply_topic: str, reply_bytes: int,
                 log_path: Path) -> None:
        super().__init__(settings, log_path)
        self.topic, self.reply_topic, self.reply_bytes = topic, reply_topic, reply_bytes

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "bench.floor", "serve", "--bootstrap", self.settings.kafka_bootstrap,
            "--topic", self.topic, "--reply-topic", self.reply_topic, "--reply-bytes", str(self.reply_bytes),
            "--group", f"floor-{uuid.uuid4().hex[:8]}",
            "--fetch-wait-ms", str(self.settings.kafka_fetch_max_wait_ms),
            "--max-message-bytes", str(self.settings.max_message_bytes),
        ]


async def create_topics(settings: Settings, topic: str, reply_topic: str) -> None:
    """The floor's own topics, partitioned like the pipeline's requests and replies topics."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, settings.request_partitions, 1),
                                   NewTopic(reply_topic, settings.reply_partitions, 1)])
    finally:
        await admin.close()


# -- the client -------------------------------------------------------------------------------


class FloorClient:
    """One producer of pre-encoded requests; the reply topic read by assignment from its end,
    as InferenceClient does."""

    def __init__(self, settings: Settings, topic: str, reply_topic: str) -> None:
        self.topic, self.reply_topic = topic, reply_topic
        self.producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, linger_ms=LINGER_MS, acks="all",
            max_request_size=settings.max_message_bytes + 64 * 1024,
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        )
        self.waiters: dict[bytes, asyncio.Future[float]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FloorClient:
        await self.producer.start()
        await self.consumer.start()
        wait_longer_when_behind(self.consumer)
        partitions = self.consumer.partitions_for_topic(self.reply_topic)
        if not partitions:
            await self.consumer._client.force_metadata_update()  # topic created just now
            partitions = self.consumer.partitions_for_topic(self.reply_topic) or set()
        assigned = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        self.consumer.assign(assigned)
        await self.consumer.seek_to_end(*assigned)
        for tp in assigned:
            await self.consumer.position(tp)
        self.reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        await self.producer.stop()
        await self.consumer.stop()

    async def _read(self) -> None:
        while True:
            chunks = await self.consumer.getmany(timeout_ms=200, max_records=MAX_POLL_RECORDS)
            now = time.perf_counter()
            for records in chunks.values():
                for record in records:
                    waiter = self.waiters.pop(record.key or b"", None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(now)

    async def send(self, key: bytes, value: bytes) -> asyncio.Future[float]:
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[key] = waiter
        await self.producer.send(self.topic, value, key=key)
        return waiter

    async def wait_ready(self, service: EchoService, value: bytes) -> None:
        """Until the service answers (its consumer has joined its group)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            service.check_running()
            waiter = await self.send(f"probe-{uuid.uuid4().hex}".encode(), value)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, PROBE_TIMEOUT_S)
                return
        raise TimeoutError(f"echo service not answering after {READY_TIMEOUT_S:.0f} s:\n"
                           f"{service.log()[-3000:]}")

    async def burst(self, value: bytes, count: int, timeout: float) -> dict:
        """`count` requests back to back; requests/s from the first send to the last reply."""
        run = uuid.uuid4().hex[:8]
        sent, waiters = [0.0] * count, []
        for i in range(count):
            sent[i] = time.perf_counter()
            waiters.append(await self.send(f"{run}-{i:023d}".encode(), value))  # 32 bytes, as ids
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        done, pending = await asyncio.wait(waiters, timeout=timeout)
        if pending:
            raise TimeoutError(f"floor: {len(done)} of {count} replies within {timeout:.0f} s")
        arrivals = [w.result() for w in waiters]
        latencies = sorted(a - s for a, s in zip(arrivals, sent))
        seconds = max(arrivals) - sent[0]
        return {"requests": count, "seconds": seconds, "req_s": count / seconds,
                "p50_ms": latencies[count // 2] * 1000,
                "p99_ms": latencies[min(count - 1, int(count * 0.99))] * 1000}


# -- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    service = sub.add_parser("serve", help="run the echo service until SIGTERM")
    service.add_argument("--bootstrap", required=True)
    service.add_argument("--topic", required=True)
    service.add_argument("--reply-topic", required=True)
    service.add_argument("--reply-bytes", type=int, required=True)
    service.add_argument("--group", required=True)
    service.add_argument("--fetch-wait-ms", type=int, default=10)
    service.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.bootstrap, args.topic, args.reply_topic, args.reply_bytes, args.group,
                      args.fetch_wait_ms, args.max_message_bytes))


if __name__ == "__main__":
    main()
