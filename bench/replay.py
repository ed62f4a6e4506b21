"""Replay publish rate versus plain aiokafka clients, in one run on a private stack.

1. fill: N stored tiny request events (header + one [1,16] float32 tensor) in a fresh requests
   topic (4 partitions), produced as clients do (aiokafka's default 16 KiB batches, linger 20 ms).
2. produce floor: a plain `AIOKafkaProducer` (acks=all, linger 20 ms, the replayer's batch size)
   sends N records of a replay copy's size to a topic of its own, `send()` without awaiting
   each, then `flush()`: what publishing alone costs on this broker.
3. copy floor: a plain consumer (the replayer's fetch settings) reads the stored topic and that
   producer re-sends each record's bytes unchanged: reading and publishing, no decoding.
4. replay: `Replayer.run()` of the whole topic to another topic, timed from the call to its
   return (reading, decoding, filtering, copying, publishing, confirmations and checkpoints).

Reports events/s of each and replay over each floor, with the box's load average before and
after (`bench/loadavg.py`: a busy box gets a warning, not a refusal).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rich.console import Console

from bench import loadavg
from bench.processes import private_stack
from infra.local.harness import isolated_settings
from streams.ops.replay import (
    FETCH_MAX_WAIT_MS,
    FETCH_MIN_BYTES,
    PUBLISH_BATCH_BYTES,
    Replayer,
    ReplayJob,
    fixed_ends,
    replay_copy,
)
from streams.settings import Settings
from topics import events
from topics.names import Topics

RESULTS_DIR = Path(__file__).parent / "results"
PARTITIONS = 4

console = Console()


def stored_event(i: int) -> bytes:
    header = events.InferenceRequest(request_id=f"orig-{i:08d}", model="tiny", reply_to="bench.replies",
                                     correlation_id=f"c{i}", tenant="bench")
    tensor = np.random.default_rng(i).standard_normal((1, 16)).astype(np.float32)
    return events.encode_request(header, {"input": tensor})


async def create_topics(settings: Settings, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names])
    finally:
        await admin.close()


async def fill(settings: Settings, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        for i in range(count):
            value = stored_event(i)
            await producer.send(topic, value, key=f"orig-{i:08d}".encode())
        await producer.flush()
    finally:
        await producer.stop()


def floor_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=20,
                            max_batch_size=PUBLISH_BATCH_BYTES)


async def produce_floor(settings: Settings, topic: str, count: int) -> float:
    """Events/s of a plain batching producer sending replay-copy-sized records."""
    request = events.decode_request(stored_event(0))
    copy = replay_copy(request.header, "baseline", topic, 0, 0)
    value = events.encode_request(copy, request.tensors)
    producer = floor_producer(settings)
    await producer.start()
    try:
        started = time.perf_counter()
        for i in range(count):
            await producer.send(topic, value, key=f"replay-baseline-{i}".encode())
        await producer.flush()
        return count / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def copy_floor(settings: Settings, source: str, topic: str, count: int) -> float:
    """Events/s of a plain consumer and producer re-sending the stored records' bytes."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_min_bytes=FETCH_MIN_BYTES,
                                fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    producer = floor_producer(settings)
    await consumer.start()
    await producer.start()
    try:
        started = time.perf_counter()
        tps = [TopicPartition(source, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        copied = 0
        while copied < count:
            for records in (await consumer.getmany(timeout_ms=500, max_records=4000)).values():
                for record in records:
                    await producer.send(topic, record.value, key=record.key)
                copied += len(records)
        await producer.flush()
        return count / (time.perf_counter() - started)
    finally:
        await producer.stop()
        await consumer.stop()


async def replay(settings: Settings, target: str, count: int) -> tuple[float, float]:
    """(events/s from the call to its return, the replayer's own progress rate)."""
    replayer = Replayer(settings, ReplayJob(name=f"bench{uuid.uuid4().hex[:6]}", target=target))
    started = time.perf_counter()
    progress = await replayer.run()
    elapsed = time.perf_counter() - started
    if progress.published != count:
        raise RuntimeError(f"the replay published {progress.published} of {count}")
    return count / elapsed, progress.rate


async def ends(settings: Settings, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return sum((await fixed_ends(consumer, tps)).values())
    finally:
        await consumer.stop()


async def measure(settings: Settings, count: int) -> dict:
    source = Topics(settings.topic_prefix).requests
    produced, copied, replayed = (f"{settings.topic_prefix}.bench.{n}" for n in ("produce", "copy", "replay"))
    await create_topics(settings, [source, produced, copied, replayed])
    started = time.perf_counter()
    await fill(settings, source, count)
    console.print(f"filled {count} events in {time.perf_counter() - started:.1f} s")
    produce_rate = await produce_floor(settings, produced, count)
    console.print(f"produce floor: {produce_rate:,.0f} events/s")
    copy_rate = await copy_floor(settings, source, copied, count)
    console.print(f"copy floor:    {copy_rate:,.0f} events/s")
    replay_rate, progress_rate = await replay(settings, replayed, count)
    console.print(f"replay:        {replay_rate:,.0f} events/s (its progress rate {progress_rate:,.0f}/s)")
    stored = await ends(settings, replayed)
    if stored < count:
        raise RuntimeError(f"the replay's target holds {stored} of {count} records")
    return {"events": count, "produce_floor_events_per_s": produce_rate, "copy_floor_events_per_s": copy_rate,
            "replay_events_per_s": replay_rate, "replay_progress_rate": progress_rate,
            "replay_over_produce_floor": replay_rate / produce_rate, "replay_over_copy_floor": replay_rate / copy_rate}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000, help="stored request events to replay")
    parser.add_argument("--broker-storage", choices=("memory", "s3"), default="memory")
    parser.add_argument("--json-out", type=Path,
                        default=RESULTS_DIR / f"replay-{datetime.now():%Y%m%d-%H%M%S}.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    load = {"before": loadavg.before_run(console)}
    with tempfile.TemporaryDirectory(prefix="inferstream-bench-") as state_dir:
        run = uuid.uuid4().hex[:8]
        settings = isolated_settings(Path(state_dir), run, topic_prefix=f"bench{run}", app_id=f"bench-{run}")
        settings = settings.model_copy(update={"broker_storage": args.broker_storage})
        with private_stack(settings, console):
            result = asyncio.run(measure(settings, args.events))
    load["after"] = loadavg.load_average()
    result.update(broker_storage=args.broker_storage, loadavg=loadavg.record(load["before"], load["after"]))
    console.print(f"replay/produce floor {result['replay_over_produce_floor']:.2f}, replay/copy floor "
                  f"{result['replay_over_copy_floor']:.2f} ({args.broker_storage} storage)")
    console.print(loadavg.summary(load["before"], load["after"]))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    console.print(f"written: {args.json_out}")


if __name__ == "__main__":
    main()
