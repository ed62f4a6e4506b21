"""Fuzzing the front door on the real stack: ten thousand hostile events on the requests topic
(random bytes, mutated events in both encodings, hostile Kafka keys and headers, events of a few
MB), good requests among them, and outsiders' events on internal topics. No agent may crash, every
event must be answered or dead-lettered, and every good request answered.

The generator is seeded: the seed is printed, and INFERSTREAM_FUZZ_SEED=<seed> replays the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from hostile import HostileEvent, HostileEvents, Probe, Probes, forged_tenant
from support.topics import topic_records
from support.waiting import wait_for

from infra.local.harness import wait_ready
from streams.client import InferenceClient
from streams.settings import Settings
from streams.storage.objects import ObjectStore
from topics import events
from topics.names import Topics

pytestmark = pytest.mark.integration

HOSTILE_EVENTS = 10_000
GOOD_EVERY = 20  # one good request per this many hostile events
PROBE_COPIES = 4
SETTLE_S = 150.0  # after the last event is produced, for every event to be accounted for
STALL_S = 60.0  # ... unless nothing more was accounted for this long
# What Faust logs when an agent raises (mode's Service.crash) and when its supervisor restarts it.
CRASH = re.compile(r"Crashed reason=|Restarting dead")
# What agents.common logs when a whole step raised: hostile input must be refused event by event.
STEP_FAILED = re.compile(r"failed on \d+ events")
FETCH_BYTES = 16 * 1024 * 1024


@dataclass
class Produced:
    event: HostileEvent
    partition: int
    offset: int


@dataclass
class Seen:
    """What the worker wrote, as read back by the test."""

    letters: dict[tuple[str, int, int], list[str]] = field(default_factory=lambda: defaultdict(list))
    foreign_letters: list[bytes] = field(default_factory=list)  # records on the dead-letter topic that are none
    replies: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # request id -> statuses
    undecodable_replies: int = 0


async def create_topic(settings: Settings, name: str, partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


def plant_foreign_objects(settings: Settings) -> list[str]:
    """Valid tensor bundles where callers must not reach: another bucket, and the product's own
    results prefix (another caller's output), directly and through a dot segment."""
    store = ObjectStore(settings)
    bundle = events.encode_bundle({"x": np.ones((1, 16), np.float32)})
    other = f"{settings.s3_bucket}-other"
    if not store.client.bucket_exists(other):
        store.client.make_bucket(other)
    store.ensure_bucket()
    secret = ObjectStore(settings.model_copy(update={"s3_bucket": other})).put("secret.bin", bundle)
    output = store.put(f"results/tiny/someone-else-{settings.app_id}.bin", bundle)
    dotted = f"s3://{settings.s3_bucket}/requests/../results/tiny/someone-else-{settings.app_id}.bin"
    return [secret, output, dotted]


async def follow(settings: Settings, topic: str, on_record: Callable[[Any], None], stop: asyncio.Event) -> None:
    """Read a topic from its beginning until `stop` is set."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=FETCH_BYTES, fetch_max_bytes=FETCH_BYTES)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        while not stop.is_set():
            for records in (await consumer.getmany(timeout_ms=300, max_records=5000)).values():
                for record in records:
                    on_record(record)
    finally:
        await consumer.stop()


def on_dead_letter(seen: Seen) -> Callable[[Any], None]:
    def record(msg: Any) -> None:
        try:
            letter = orjson.loads(msg.value)
            where = (letter["source_topic"], letter["source_partition"], letter["source_offset"])
            seen.letters[where].append(letter["reason"])
        except (orjson.JSONDecodeError, TypeError, KeyError):
            seen.foreign_letters.append((msg.value or b"")[:200])
    return record


def on_reply(seen: Seen) -> Callable[[Any], None]:
    def record(msg: Any) -> None:
        try:
            result = events.decode_result(msg.value)
        except Exception:  # noqa: BLE001 - anything on the reply topic that is not a result
            seen.undecodable_replies += 1
            return
        seen.replies[result.header.request_id].append(result.header.status.value)
    return record


async def produce(producer: AIOKafkaProducer, topic: str, value: bytes | None, key: bytes | None,
                  headers: list) -> asyncio.Future:
    """The delivery future of one send; a send refused at once (e.g. over the client's size
    limit) gives a future that holds the error."""
    try:
        return await producer.send(topic, value, key=key, headers=headers)
    except KafkaError as exc:
        refused: asyncio.Future = asyncio.get_running_loop().create_future()
        refused.set_exception(exc)
        return refused


def storable(request_id: str) -> bool:
    """Whether PostgreSQL text can hold it (a query with it would fail)."""
    try:
        request_id.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in request_id


async def fetch_rows(conn: asyncpg.Connection, request_ids: list[str]) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(
        "SELECT request_id, status, error_code, tenant FROM inference_results WHERE request_id = ANY($1::text[])",
        request_ids,
    )
    return {row["request_id"]: row for row in rows}


def good_request(made: HostileEvents, run: str, number: int) -> tuple[str, bytes]:
    request_id = f"good-{run}-{number}"
    request = events.InferenceRequest(request_id=request_id, model="tiny", reply_to=made.reply_topic,
                                      correlation_id=f"c-{request_id}", deadline_ms=events.now_ms() + 600_000)
    inputs = {"x": np.random.default_rng(number).standard_normal((1 + number % 4, 16), dtype=np.float32)}
    return request_id, events.encode_request(request, inputs, binary=number % 2 == 0)


@pytest.mark.timeout(480)
async def test_hostile_events_never_crash_a_worker_and_each_is_answered_or_dead_lettered(
    start_worker, settings, tmp_path: Path,
):
    seed = int(os.environ.get("INFERSTREAM_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\nfuzz seed {seed} (rerun with INFERSTREAM_FUZZ_SEED={seed})")
    started = time.monotonic()
    topics = Topics(settings.topic_prefix)
    run = settings.app_id
    reply_topic = f"fuzz-replies-{run}"
    await create_topic(settings, reply_topic)
    foreign_refs = await asyncio.to_thread(plant_foreign_objects, settings)
    made = HostileEvents(random.Random(seed), topics, reply_topic, foreign_refs, run)
    probes = Probes(made).all(first_index=2 * HOSTILE_EVENTS, copies=PROBE_COPIES)
    large = made.large(index=3 * HOSTILE_EVENTS)
    outsiders = [p for p in probes if p.event.topic != topics.requests]
    hostile_count = HOSTILE_EVENTS - len(large) - (len(probes) - len(outsiders))
    hostile = [made.event(i) for i in range(hostile_count)]
    # The large and the probing events spread through the stream.
    plan: list[HostileEvent | Probe] = [*hostile]
    extras: list[HostileEvent | Probe] = [*large, *probes]
    for extra in extras:
        plan.insert(made.rng.randrange(len(plan) + 1), extra)

    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)

    seen = Seen()
    stop = asyncio.Event()
    readers = [asyncio.create_task(follow(settings, topics.deadletter, on_dead_letter(seen), stop)),
               asyncio.create_task(follow(settings, reply_topic, on_reply(seen), stop))]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=20, acks="all",
                                max_request_size=settings.max_message_bytes + 64 * 1024)
    await producer.start()
    sent: list[tuple[HostileEvent | Probe, asyncio.Future]] = []
    good: dict[str, asyncio.Future] = {}
    try:
        for number, item in enumerate(plan):
            event = item.event if isinstance(item, Probe) else item
            sent.append((item, await produce(producer, event.topic, event.value, event.key, event.headers)))
            if number % GOOD_EVERY == GOOD_EVERY - 1:
                request_id, value = good_request(made, run, number)
                good[request_id] = await produce(producer, topics.requests, value, request_id.encode(), [])
        await producer.flush()
    finally:
        await producer.stop()
    produce_s = time.monotonic() - started

    produced: list[tuple[HostileEvent | Probe, Produced]] = []
    not_produced: list[tuple[HostileEvent, str]] = []
    for item, future in sent:
        event = item.event if isinstance(item, Probe) else item
        if future.exception() is not None:
            not_produced.append((event, repr(future.exception())))
        else:
            metadata = future.result()
            produced.append((item, Produced(event, metadata.partition, metadata.offset)))
    lost_sends = [rid for rid, future in good.items() if future.exception() is not None]
    carried = {id(item): (item.request_id if isinstance(item, Probe) else item.carried_request_id())
               for item, _ in produced}
    ids = sorted({rid for rid in carried.values() if rid and storable(rid)} | set(good))

    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        deadline = time.monotonic() + SETTLE_S
        progress = {"open": -1, "at": time.monotonic()}

        async def open_items() -> tuple[list, list, dict]:
            """What is not accounted for yet (events, good requests), and the stored rows."""
            rows = await fetch_rows(conn, ids)
            unaccounted = [(item, where) for item, where in produced
                           if not accounted(item, where, carried[id(item)], seen, rows)]
            lost_good = [rid for rid in good if rid not in lost_sends and not good_answered(rid, seen, rows)]
            if len(unaccounted) + len(lost_good) != progress["open"]:
                progress["open"], progress["at"] = len(unaccounted) + len(lost_good), time.monotonic()
            return unaccounted, lost_good, rows

        def settled(state: tuple[list, list, dict]) -> bool:
            """All accounted for, or no progress for STALL_S, past the deadline, or the worker gone:
            the checks below then say what is missing."""
            now = time.monotonic()
            return ((not state[0] and not state[1]) or now > deadline or now - progress["at"] > STALL_S
                    or worker.proc.poll() is not None)

        unaccounted, lost_good, rows = await wait_for(open_items, timeout=SETTLE_S + 60, interval=1.0, until=settled,
                                                      what="hostile events accounted for")
        settle_s = time.monotonic() - started - produce_s
        total_rows, distinct_rows = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT request_id) FROM inference_results")
    finally:
        await conn.close()
        stop.set()
        await asyncio.gather(*readers)

    leaked = await leaked_replies(settings, topics)
    probe_failures = check_probes(produced, seen, rows, run)
    replied_not_stored = sorted(rid for rid in seen.replies if rid not in rows)
    # The stored record must say what the caller was told.
    contradicted = sorted(rid for rid, statuses in seen.replies.items()
                          if rid in rows and "ok" in statuses and rows[rid]["status"] != "ok")
    crash_lines = [line for line in worker.log().splitlines() if CRASH.search(line)]
    step_failures = [line for line in worker.log().splitlines() if STEP_FAILED.search(line)]
    worker_alive = worker.proc.poll() is None
    figures = {
        "seed": seed, "events": len(plan) + len(good), "hostile": len(plan) - len(outsiders),
        "outsider_internal": len(outsiders), "good": len(good), "not_produced": len(not_produced),
        "crashes": len(crash_lines), "step_failures": len(step_failures), "worker_alive": worker_alive,
        "unaccounted": len(unaccounted),
        "lost_good": len(lost_good), "duplicate_rows": total_rows - distinct_rows,
        "probe_failures": len(probe_failures), "leaked_replies": len(leaked),
        "foreign_deadletter_records": len(seen.foreign_letters), "dead_letters": sum(map(len, seen.letters.values())),
        "duplicate_dead_letters": sum(len(v) - 1 for v in seen.letters.values()),
        "replied_not_stored": len(replied_not_stored), "reply_contradicts_row": len(contradicted),
        "replies": sum(map(len, seen.replies.values())), "rows": total_rows,
        "produce_s": round(produce_s, 1), "settle_s": round(settle_s, 1),
        "last_progress_s": round(progress["at"] - started, 1),
    }
    details: dict[str, Any] = {
        "figures": figures,
        "crash_lines": crash_lines[:20],
        "step_failures": step_failures[:5],
        "unaccounted": [{"partition": w.partition, "offset": w.offset, **w.event.reproducer()}
                        for _, w in unaccounted[:50]],
        "unaccounted_by_kind": count_kinds(w.event for _, w in unaccounted),
        "duplicate_dead_letters_by_topic": count_by_topic(seen),
        "lost_good": lost_good[:50],
        "replied_not_stored": [rid[:200] for rid in replied_not_stored[:50]],
        "reply_contradicts_row": [{"request_id": rid[:200], "row": dict(rows[rid])} for rid in contradicted[:50]],
        "probe_failures": probe_failures[:50],
        "leaked_replies": leaked[:50],
        "foreign_deadletter_records": [repr(v) for v in seen.foreign_letters[:20]],
        "not_produced": [{"error": e, **ev.reproducer(limit=256)} for ev, e in not_produced[:20]],
    }
    path = tmp_path / "fuzz-figures.json"
    path.write_text(json.dumps(details, indent=1, default=str))
    print("FUZZ " + " ".join(f"{k}={v}" for k, v in figures.items()))
    print(f"fuzz details: {path}")

    failures = {k: figures[k] for k in ("crashes", "step_failures", "unaccounted", "lost_good", "duplicate_rows",
                                        "probe_failures", "leaked_replies", "foreign_deadletter_records",
                                        "not_produced", "reply_contradicts_row")
                if figures[k]}
    if not worker_alive:
        failures["worker_alive"] = False
    assert not failures, (f"seed {seed}: {failures}; details in {path}\n"
                          + "\n".join(crash_lines[:5] + step_failures[:2])
                          + f"\nfirst unaccounted: {details['unaccounted'][:3]}"
                          + f"\nprobe failures: {probe_failures[:5]}\nworker log tail:\n{worker.log()[-2000:]}")


def accounted(item: HostileEvent | Probe, where: Produced, request_id: str | None, seen: Seen,
              rows: dict[str, asyncpg.Record]) -> bool:
    """Dead-lettered from where it was produced, or answered under its id: a stored row (a
    reply alone is no answer: the results table is the record of what was served or refused)."""
    if seen.letters.get((where.event.topic, where.partition, where.offset)):
        return True
    if isinstance(item, Probe) and item.expect == "unauthenticated":
        return False  # only a dead letter accounts for an outsider's internal event
    return request_id is not None and request_id in rows


def good_answered(request_id: str, seen: Seen, rows: dict[str, asyncpg.Record]) -> bool:
    row = rows.get(request_id)
    return seen.replies.get(request_id, [None])[0] == "ok" and row is not None and row["status"] == "ok"


def check_probes(produced: list[tuple[HostileEvent | Probe, Produced]], seen: Seen,
                 rows: dict[str, asyncpg.Record], run: str) -> list[dict[str, Any]]:
    """Each probe that did not get what it expects, with why."""
    failures = []
    for item, where in produced:
        if not isinstance(item, Probe):
            continue
        row = rows.get(item.request_id or "")
        replies = seen.replies.get(item.request_id or "", [])
        served = (row is not None and row["status"] == "ok") or "ok" in replies
        letters = seen.letters.get((where.event.topic, where.partition, where.offset), [])
        problem = None
        if item.expect == "ok":
            if not served:
                problem = f"not served (row {dict(row) if row else None}, replies {replies}, dead letters {letters})"
            elif row is not None and row["tenant"] == forged_tenant(run):
                problem = f"the forged tenant header was trusted (row tenant {row['tenant']!r})"
        elif item.expect == "refused" and served:
            problem = "served from an object callers may not read"
        elif item.expect == "unauthenticated":
            if served:
                problem = f"an outsider's event on {where.event.topic} was served (row {dict(row) if row else None})"
            elif "UNAUTHENTICATED" not in letters:
                problem = f"not dead-lettered as UNAUTHENTICATED (dead letters {letters})"
        if problem:
            failures.append({"kind": item.event.kind, "topic": where.event.topic, "partition": where.partition,
                             "offset": where.offset, "request_id": item.request_id, "problem": problem})
    return failures


async def leaked_replies(settings: Settings, topics: Topics) -> list[dict[str, Any]]:
    """Replies the worker wrote to internal topics: records keyed by a test correlation id
    (`c-...`), which only a reply carries."""
    internal = [topics.requests, topics.results, topics.deadletter, topics.batches, topics.registry,
                topics.model("tiny"), topics.model("resnet18")]
    read = await asyncio.gather(*(topic_records(settings, topic) for topic in internal))
    return [{"topic": topic, "partition": record.partition, "offset": record.offset,
             "key": record.key[:80].decode(errors="replace")}
            for topic, records in zip(internal, read) for record in records
            if record.key and record.key.startswith(b"c-")]


def count_kinds(made: Any) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for event in made:
        counts[event.kind.split(":")[0] + (":" + event.kind.split(":")[1][:30] if ":" in event.kind else "")] += 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def count_by_topic(seen: Seen) -> dict[str, int]:
    """Source offsets dead-lettered more than once (redone steps), by source topic."""
    counts: dict[str, int] = defaultdict(int)
    for (topic, _, _), reasons in seen.letters.items():
        if len(reasons) > 1:
            counts[topic] += len(reasons) - 1
    return dict(counts)
