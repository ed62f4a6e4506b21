"""Replay of stored request events and redrive of dead letters, end to end on the real stack."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from support.cli_process import run_cli
from support.presence import wait_until_served
from support.topics import topic_records
from support.waiting import wait_for

from infra.local.harness import tiny_input, wait_ready
from streams.client import InferenceClient
from streams.kafka.offsets import fixed_ends
from streams.ops.dlq import read_letters, redrive, select
from streams.ops.replay import Replayer, ReplayJob, compare
from streams.registry.store import RegistryStore, info_from_artifact
from streams.storage.objects import ObjectStore
from streams.storage.results import ResultsStore
from topics import events
from topics.errors import ErrorCode
from topics.names import Topics

pytestmark = pytest.mark.integration


async def answered(client: InferenceClient, count: int, seed: int) -> list[str]:
    """Send `count` tiny requests, wait for every reply; their request ids."""
    pending = []
    for i in range(count):
        request = client.request("tiny", timeout=60)
        pending.append((request, await client.send(request, tiny_input(seed=seed + i))))
    results = await asyncio.gather(*(client.wait(r, w) for r, w in pending))
    assert all(r.header.status == "ok" for r in results), [r.header.error for r in results][:3]
    return [request.request_id for request, _ in pending]


async def next_millisecond() -> int:
    """A time (ms) later than every event sent so far, waited for: events sent from now on are
    stamped at or after it (a replay window's edge)."""
    edge = events.now_ms() + 1
    await wait_for(lambda: events.now_ms() >= edge, timeout=1, interval=0.001, what="the clock's next millisecond")
    return edge


async def register_tiny(settings, version: str) -> None:
    """Version `version` of tiny with the artifact of version 1 (weight 0: only named requests)."""
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=2)
    redis = aioredis.from_url(settings.redis_url)
    try:
        registry = RegistryStore(settings, pool, redis)
        v1 = await registry.get("tiny", "1")
        info = await asyncio.to_thread(info_from_artifact, "tiny", version, str(v1.path), registry.store,
                                       settings.state_dir / "artifacts", weight=0,
                                       max_batch_size=v1.max_batch_size)
        await registry.save(info)
    finally:
        await redis.aclose()
        await pool.close()


async def test_time_window_replay_is_stored_beside_originals_and_compares(start_worker, settings):
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        await answered(client, 5, seed=0)  # before the window
        since = await next_millisecond()
        window = await answered(client, 7, seed=100)
        until = await next_millisecond()
        await answered(client, 4, seed=200)  # after the window
    async with ResultsStore(settings.postgres_dsn) as results:
        before = await results.wait_until_stored(window)
        progress = await Replayer(settings, ReplayJob(name="win", since_ms=since, until_ms=until)).run()
        assert progress.published == 7
        assert sorted(progress.origins.values()) == sorted(window)
        replays = await results.wait_until_stored(list(progress.origins))
        assert len(replays) == 7 and all(r["status"] == "ok" for r in replays.values())
        after = await results.wait_until_stored(window)
        assert {k: dict(v) for k, v in after.items()} == {k: dict(v) for k, v in before.items()}  # untouched
        assert not set(replays) & set(window)

        await register_tiny(settings, "2")
        await wait_until_served(settings, "tiny/2")
        job = ReplayJob(name="cmp", since_ms=since, until_ms=until, version="2")
        progress = await Replayer(settings, job).run()
        report, uri = await compare(settings, progress.origins, "2", "cmp", timeout=60)
        assert report["compared"] == 7 and report["top1_agreement"] == 1.0, report
        assert report["max_abs_diff"]["max"] <= 1e-5 and report["differing"] == [], report
        assert report["missing_replays"] == [] and report["missing_originals"] == []
        versions = {r["model_version"] for r in (await results.wait_until_stored(list(progress.origins))).values()}
        assert versions == {"2"}
        stored = orjson.loads(await ObjectStore(settings).aget(uri))
        assert stored["top1_agreement"] == 1.0 and stored["version"] == "2"


async def topic_ends(settings, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return {tp.partition: end for tp, end in (await fixed_ends(consumer, tps)).items()}
    finally:
        await consumer.stop()


async def test_cli_replay_dry_run_sends_nothing_and_replay_is_answered_and_stored(start_worker, settings):
    """The README's `inferstream replay`, run as the command: a dry run counts the window and
    sends nothing; the real replay publishes copies that the worker answers and stores beside
    the originals."""
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        since = events.now_ms()  # after the readiness probes: the window holds only these
        window = await answered(client, 4, seed=300)
    requests_topic = Topics(settings.topic_prefix).requests
    checkpoints = settings.state_dir / "replay"
    async with ResultsStore(settings.postgres_dsn) as results:
        before = await results.wait_until_stored(window)
        assert len(before) == 4

        ends = await topic_ends(settings, requests_topic)
        out = (await run_cli("replay", "--name", "clidry", "--since", str(since), "--dry-run",
                             settings=settings)).output
        assert "replay clidry: read " in out and "would publish 4 " in out, out
        # Not a terminal: progress as plain lines (read so far of the window), then the summary.
        assert re.search(r"^replay clidry: read \d+/\d+, would publish \d+, \d+/s$", out, re.M), out
        assert await topic_ends(settings, requests_topic) == ends  # nothing sent
        assert not (checkpoints / "clidry.json").exists()  # a dry run keeps no checkpoint

        out = (await run_cli("replay", "--name", "cli", "--since", str(since), settings=settings)).output
        assert "replay cli: read " in out and "published 4 " in out, out
        assert (checkpoints / "cli.json").exists()
        assert sum((await topic_ends(settings, requests_topic)).values()) == sum(ends.values()) + 4

        async def replayed() -> dict:
            return {r["request_id"]: r for r in await results.pool.fetch(
                "SELECT * FROM inference_results WHERE request_id LIKE 'replay-cli-%'")}

        replays = await wait_for(replayed, timeout=60, interval=0.5, until=lambda rows: len(rows) >= 4,
                                 what="the 4 replayed requests stored")
        assert len(replays) == 4 and all(r["status"] == "ok" for r in replays.values()), replays
        after = await results.wait_until_stored(window)
        assert {k: dict(v) for k, v in after.items()} == {k: dict(v) for k, v in before.items()}  # untouched
        assert not await results.pool.fetch(
            "SELECT 1 FROM inference_results WHERE request_id LIKE 'replay-clidry-%'")


async def test_stopped_replay_resumes_without_duplicates(topics_ready):
    settings = topics_ready
    topics = Topics(settings.topic_prefix)
    target = topics.model("tiny")  # any existing topic nobody reads here will do: no worker runs
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(30):
            header = events.InferenceRequest(request_id=f"orig-{i}", model="tiny")
            await producer.send(topics.requests, events.encode_request(header, tiny_input(seed=i)),
                                key=header.request_id.encode())
        await producer.flush()
    finally:
        await producer.stop()

    first = await Replayer(settings, ReplayJob(name="stop", target=target, max_events=12)).run()
    assert first.published == 12
    dry = await Replayer(settings, ReplayJob(name="stop", target=target, resume=True, dry_run=True)).run()
    assert dry.published == 18  # a dry run counts and does not move the checkpoint
    second = await Replayer(settings, ReplayJob(name="stop", target=target, resume=True)).run()
    assert second.published == 18

    copies = [events.decode_request_header(r.value)[0] for r in await topic_records(settings, target)]
    assert len(copies) == 30
    assert len({c.request_id for c in copies}) == 30
    assert {c.replay_of.request_id for c in copies} == {f"orig-{i}" for i in range(30)}
    assert all(c.reply_to is None and c.correlation_id is None for c in copies)


async def test_batched_pipelined_replay_stops_and_resumes_with_each_copy_once(topics_ready, monkeypatch):
    """On the real broker: copies go out as record batches (few produce calls), land on the
    partition their key hashes to (as `send(key=...)` places them), and a stop then a resume
    publish each stored event exactly once."""
    from aiokafka.partitioner import murmur2

    import streams.ops.replay as replay_module

    settings = topics_ready
    topics = Topics(settings.topic_prefix)
    target = topics.model("tiny")  # any existing topic nobody reads here will do: no worker runs
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for i in range(300):
            header = events.InferenceRequest(request_id=f"orig-{i}", model="tiny", reply_to="x.replies")
            await producer.send(topics.requests, events.encode_request(header, tiny_input(seed=i)),
                                key=header.request_id.encode())
        await producer.flush()
    finally:
        await producer.stop()

    monkeypatch.setattr(replay_module, "CHUNK_RECORDS", 40)
    batches: list[int] = []
    send_batch = AIOKafkaProducer.send_batch

    async def counted(self, batch, topic, *, partition):
        batches.append(batch.record_count())
        return await send_batch(self, batch, topic, partition=partition)

    monkeypatch.setattr(AIOKafkaProducer, "send_batch", counted)
    first = await Replayer(settings, ReplayJob(name="batched", target=target, max_events=130)).run()
    second = await Replayer(settings, ReplayJob(name="batched", target=target, resume=True)).run()
    assert (first.published, second.published) == (130, 170)
    assert sum(batches) == 300 and len(batches) < 300 / 4 and max(batches) > 1

    copies = [(r.partition, r.key, events.decode_request_header(r.value)[0])
              for r in await topic_records(settings, target)]
    assert sorted(c.replay_of.request_id for _, _, c in copies) == sorted(f"orig-{i}" for i in range(300))
    assert all(key == c.request_id.encode() and c.reply_to is None for _, key, c in copies)
    partitions = settings.model_partitions  # of every model topic
    assert all(partition == (murmur2(key) & 0x7FFFFFFF) % partitions for partition, key, _ in copies)


async def test_redriven_dead_letter_is_answered_after_its_cause_is_fixed(start_worker, settings):
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        request = client.request("tiny", version="5", timeout=120)
        result = await client.wait(request, await client.send(request, tiny_input(seed=5)))
    assert result.header.status == "error" and result.header.error.code == ErrorCode.UNKNOWN_VERSION

    async def unknown_version() -> list:
        return select(await read_letters(settings), reasons={"UNKNOWN_VERSION"})

    letters = await wait_for(unknown_version, timeout=30, interval=0.3, what="the UNKNOWN_VERSION dead letter")
    assert [x.letter.request_id for x in letters] == [request.request_id]

    await register_tiny(settings, "5")
    await wait_until_served(settings, "tiny/5")
    sent, skipped = await redrive(settings, letters)
    assert (len(sent), skipped) == (1, [])
    again, skipped = await redrive(settings, letters)  # idempotent per dead-letter offset
    assert (again, len(skipped)) == ([], 1)

    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=2)
    try:
        row = await wait_for(
            lambda: pool.fetchrow("SELECT * FROM inference_results WHERE request_id = $1", request.request_id),
            timeout=60, interval=0.5, until=lambda found: found is not None and found["status"] == "ok",
            what="the redriven request stored ok")
        assert row is not None and row["status"] == "ok" and row["model_version"] == "5", dict(row or {})
    finally:
        await pool.close()
