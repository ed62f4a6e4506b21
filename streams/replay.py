"""Replay stored request events: read a topic by time range and/or offsets with a consumer of our
own (assigned partitions, no group, so the live groups' committed offsets are never touched),
filter the requests, and re-publish copies to the pipeline, to one model version or to another
topic.

A copy gets a deterministic id (`replay-<name>-<partition>-<offset>`), carries its origin
(`replay_of`) and answers no caller: its result is stored beside the original's, and a resumed
or repeated replay only rewrites the same rows. The checkpoint (next offset per partition) is
written only after the broker confirmed the sends, so a crash re-sends at most the same ids.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from streams.objectstore import ObjectStore
from streams.settings import Settings
from topics import events
from topics.errors import EventError
from topics.events import InferenceRequest, ReplayOrigin
from topics.names import Topics

DIFF_TOLERANCE = 1e-6  # outputs further apart than this count as differing


# -- selection (pure) --------------------------------------------------------------------------


def parse_time(value: str) -> int:
    """Unix epoch milliseconds from digits, or an ISO 8601 time (UTC when it names no zone)."""
    if value.isdigit():
        return int(value)
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_positions(values: Iterable[str]) -> list[tuple[int, int]]:
    """`PARTITION:OFFSET` strings into (partition, offset) pairs."""
    positions = []
    for value in values:
        partition, sep, offset = value.partition(":")
        if not (sep and partition.isdigit() and offset.isdigit()):
            raise ValueError(f"expected PARTITION:OFFSET, got {value!r}")
        positions.append((int(partition), int(offset)))
    return positions


def parse_offsets(values: Iterable[str]) -> dict[int, int]:
    """`PARTITION:OFFSET` strings into {partition: offset} (one offset per partition)."""
    return dict(parse_positions(values))


def plan_ranges(
    bounds: dict[int, tuple[int, int]], *, since: dict[int, int] | None = None,
    from_offsets: dict[int, int] | None = None,
    to_offsets: dict[int, int] | None = None, resume: dict[int, int] | None = None,
) -> dict[int, tuple[int, int]]:
    """Per partition, the offsets [start, end) to read: its stored [earliest, latest) narrowed
    by the offsets where the time range starts, the explicit offsets (`to_offsets` inclusive) and a
    checkpoint's next offsets. Explicit offsets restrict the replay to the partitions they name."""
    since, resume = since or {}, resume or {}
    from_offsets, to_offsets = from_offsets or {}, to_offsets or {}
    named = set(from_offsets) | set(to_offsets)
    ranges: dict[int, tuple[int, int]] = {}
    for partition, (earliest, latest) in sorted(bounds.items()):
        if named and partition not in named:
            continue
        start = max(earliest, since.get(partition, earliest), from_offsets.get(partition, earliest),
                    resume.get(partition, earliest))
        end = min(latest, to_offsets.get(partition, latest - 1) + 1)
        ranges[partition] = (start, max(start, end))
    return ranges


@dataclass(frozen=True)
class Filters:
    model: str | None = None
    tenant: str | None = None
    request_ids: frozenset[str] | None = None
    errors_only: bool = False  # only requests whose stored result is an error

    @property
    def needs_results(self) -> bool:
        """The tenant is often set by the intake's auth, so it is also looked up in the results."""
        return self.errors_only or self.tenant is not None

    def match(self, request: InferenceRequest, stored: dict[str, Any] | None = None) -> bool:
        """`stored`: the request's result row (status, tenant), when `needs_results`."""
        if self.model is not None and request.model != self.model:
            return False
        if self.request_ids is not None and request.request_id not in self.request_ids:
            return False
        if self.tenant is not None and self.tenant not in (request.tenant, stored and stored["tenant"]):
            return False
        return not self.errors_only or (stored is not None and stored["status"] == "error")


def replay_id(name: str, partition: int, offset: int) -> str:
    return f"replay-{name}-{partition}-{offset}"


def replay_copy(request: InferenceRequest, name: str, topic: str, partition: int, offset: int,
                version: str | None = None) -> InferenceRequest:
    """The copy to publish: a new deterministic id, its origin, no caller to answer, no deadline
    (the original's has passed), and no batch (a batch's output must not gain rows)."""
    return request.model_copy(update={
        "request_id": replay_id(name, partition, offset), "version": version or request.version,
        "reply_to": None, "correlation_id": None, "deadline_ms": None, "batch_id": None,
        "shadow_of": None, "created_ms": events.now_ms(),
        "replay_of": ReplayOrigin(topic=topic, partition=partition, offset=offset, request_id=request.request_id),
    })


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


# -- checkpoint --------------------------------------------------------------------------------


class Checkpoint:
    """A named replay's next offset per partition, in a JSON file replaced atomically."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f"{name}.json"

    def load(self) -> dict[int, int]:
        if not self.path.exists():
            return {}
        return {int(p): o for p, o in json.loads(self.path.read_text())["next"].items()}

    def save(self, next_offsets: dict[int, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"next": {str(p): o for p, o in sorted(next_offsets.items())}}))
        os.replace(tmp, self.path)


# -- replay ------------------------------------------------------------------------------------


@dataclass
class ReplayJob:
    name: str
    topic: str | None = None  # default: the requests topic
    target: str | None = None  # default: the requests topic (the normal pipeline)
    version: str | None = None  # route every copy to this model version
    since_ms: int | None = None
    until_ms: int | None = None
    from_offsets: dict[int, int] = field(default_factory=dict)
    to_offsets: dict[int, int] = field(default_factory=dict)  # inclusive
    filters: Filters = field(default_factory=Filters)
    rate: float | None = None  # events per second
    max_events: int | None = None  # stop after publishing this many
    dry_run: bool = False
    resume: bool = False


@dataclass
class Progress:
    total: int = 0  # records in the selected offset ranges
    read: int = 0
    published: int = 0  # or, in a dry run, would be published
    undecodable: int = 0
    origins: dict[str, str] = field(default_factory=dict)  # replay id -> original request id
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        return self.published / max(time.monotonic() - self.started, 1e-3)


class Replayer:
    def __init__(self, settings: Settings, job: ReplayJob) -> None:
        topics = Topics(settings)
        self.settings = settings
        self.job = job
        self.topic = job.topic or topics.requests
        self.target = job.target or topics.requests
        self.checkpoint = Checkpoint(settings.state_dir / "replay", job.name)
        self.progress = Progress()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
            max_request_size=settings.max_message_bytes + 64 * 1024,
        )
        self._pool: asyncpg.Pool | None = None

    async def run(self, on_progress: Callable[[Progress], None] = lambda _: None) -> Progress:
        await self._consumer.start()
        try:
            if not self.job.dry_run:
                await self._producer.start()
            if self.job.filters.needs_results:
                self._pool = await asyncpg.create_pool(self.settings.postgres_dsn, min_size=1, max_size=2)
            await self._replay(await self._ranges(), on_progress)
        finally:
            if self._pool is not None:
                await self._pool.close()
            await self._producer.stop()
            await self._consumer.stop()
        return self.progress

    async def _ranges(self) -> dict[int, tuple[int, int]]:
        partitions = self._consumer.partitions_for_topic(self.topic)
        if not partitions:
            await self._consumer._client.force_metadata_update()  # a topic created just now
            partitions = self._consumer.partitions_for_topic(self.topic)
        if not partitions:
            raise RuntimeError(f"topic {self.topic!r} does not exist")
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        earliest = await self._consumer.beginning_offsets(tps)
        # The end is fixed now: replaying into the topic being read must not chase its own copies.
        latest = await fixed_ends(self._consumer, tps)
        bounds = {tp.partition: (earliest[tp], latest[tp]) for tp in tps}
        return plan_ranges(
            bounds, since=await self._offsets_at(tps, self.job.since_ms, latest),
            from_offsets=self.job.from_offsets, to_offsets=self.job.to_offsets,
            resume=self.checkpoint.load() if self.job.resume else None,
        )

    async def _offsets_at(self, tps: list[TopicPartition], ms: int | None,
                          latest: dict[TopicPartition, int]) -> dict[int, int] | None:
        """Per partition, the first offset stored at or after `ms` (its end when none is)."""
        if ms is None:
            return None
        found = await self._consumer.offsets_for_times({tp: ms for tp in tps})
        return {tp.partition: (found[tp].offset if found.get(tp) else latest[tp]) for tp in tps}

    async def _replay(self, ranges: dict[int, tuple[int, int]], on_progress: Callable[[Progress], None]) -> None:
        active = {TopicPartition(self.topic, p): end for p, (start, end) in ranges.items() if start < end}
        self.progress.total = sum(end - start for start, end in ranges.values())
        next_offsets = {p: start for p, (start, _) in ranges.items()}
        self._consumer.assign(list(active))
        for tp in active:
            self._consumer.seek(tp, ranges[tp.partition][0])
        on_progress(self.progress)
        while active and not self._limit_reached():
            batches = await self._consumer.getmany(*active, timeout_ms=500, max_records=500)
            records = [r for tp, rs in batches.items() for r in rs if r.offset < active[tp]]
            await self._publish(records, next_offsets)
            if not self.job.dry_run:
                self.checkpoint.save(next_offsets)
            on_progress(self.progress)
            for tp in list(active):
                if await self._consumer.position(tp) >= active[tp]:
                    del active[tp]
                    self._consumer.pause(tp)

    def _in_time_range(self, timestamp: int) -> bool:
        """Checked per record: the local broker (Tansu) answers offsets_for_times per record
        batch, so its offsets only narrow where reading starts."""
        return ((self.job.since_ms is None or timestamp >= self.job.since_ms)
                and (self.job.until_ms is None or timestamp < self.job.until_ms))

    def _limit_reached(self) -> bool:
        return self.job.max_events is not None and self.progress.published >= self.job.max_events

    async def _publish(self, records: list[ConsumerRecord], next_offsets: dict[int, int]) -> None:
        """Publish the matching records in order and wait for the broker to confirm them;
        `next_offsets` advances past every record handled (matching or not)."""
        stored = await self._stored_results(records)
        sends = []
        for record in records:
            if self._limit_reached():
                break
            self.progress.read += 1
            next_offsets[record.partition] = record.offset + 1
            if not self._in_time_range(record.timestamp):
                continue
            try:
                request = events.decode_request(record.value)
            except EventError:
                self.progress.undecodable += 1
                continue
            if not self.job.filters.match(request.header, stored.get(request.header.request_id)):
                continue
            copy = replay_copy(request.header, self.job.name, self.topic, record.partition, record.offset,
                               self.job.version)
            if not self.job.dry_run:
                await self._pace()
                sends.append(await self._producer.send(
                    self.target, events.encode_request(copy, request.tensors), key=copy.request_id.encode()))
            self.progress.published += 1
            self.progress.origins[copy.request_id] = request.header.request_id
        await asyncio.gather(*sends)

    async def _pace(self) -> None:
        if self.job.rate:
            await asyncio.sleep(max(0.0, self.progress.started + self.progress.published / self.job.rate
                                    - time.monotonic()))

    async def _stored_results(self, records: list[ConsumerRecord]) -> dict[str, dict[str, Any]]:
        """The result rows (status, tenant) of these records' requests, when a filter needs them."""
        if self._pool is None or not records:
            return {}
        ids = []
        for record in records:
            try:
                ids.append(events.decode_request_header(record.value)[0].request_id)
            except EventError:
                continue
        rows = await self._pool.fetch(
            "SELECT request_id, status, tenant FROM inference_results WHERE request_id = ANY($1::text[])", ids)
        return {row["request_id"]: dict(row) for row in rows}


# -- compare -----------------------------------------------------------------------------------


@dataclass
class Pair:
    """An original result and its replay's, as stored."""

    request_id: str
    replay_id: str
    original_status: str
    replay_status: str
    original: np.ndarray | None  # the first output tensor
    replayed: np.ndarray | None
    original_ms: float | None  # timings_ms.total
    replay_ms: float | None


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p95": float(np.percentile(array, 95)), "max": float(array.max())}


def compare_pairs(pairs: list[Pair], version: str) -> dict[str, Any]:
    """The comparison report: top-1 agreement (argmax of the first output along its last axis),
    max abs diff stats, status changes, latency difference and the differing request ids."""
    diffs: list[float] = []
    top1_changes: list[dict[str, Any]] = []
    differing: list[str] = []
    status_changes = 0
    compared = 0
    for pair in pairs:
        if pair.original_status != pair.replay_status:
            status_changes += 1
            differing.append(pair.request_id)
            continue
        if pair.original is None or pair.replayed is None:
            continue  # both failed: nothing to compare
        compared += 1
        if pair.original.shape != pair.replayed.shape:
            top1_changes.append({"request_id": pair.request_id, "replay_id": pair.replay_id, "shape_changed": True})
            differing.append(pair.request_id)
            continue
        diff = float(np.max(np.abs(pair.original.astype(np.float64) - pair.replayed))) if pair.original.size else 0.0
        diffs.append(diff)
        before, after = np.argmax(pair.original, axis=-1), np.argmax(pair.replayed, axis=-1)
        if not np.array_equal(before, after):
            top1_changes.append({"request_id": pair.request_id, "replay_id": pair.replay_id,
                                 "original": before.tolist(), "replayed": after.tolist()})
        if diff > DIFF_TOLERANCE or not np.array_equal(before, after):
            differing.append(pair.request_id)
    latency = [p.replay_ms - p.original_ms for p in pairs if p.replay_ms is not None and p.original_ms is not None]
    return {
        "version": version, "pairs": len(pairs), "compared": compared, "status_changes": status_changes,
        "top1_agreement": (compared - len(top1_changes)) / compared if compared else None,
        "top1_changes": top1_changes, "max_abs_diff": _stats(diffs),
        "latency_diff_ms": _stats(latency), "differing": differing,
    }


async def _first_output(row: asyncpg.Record, store: ObjectStore) -> np.ndarray | None:
    raw = row["outputs"] if row["outputs"] is not None else (
        await store.aget(row["outputs_ref"]) if row["outputs_ref"] else None)
    if raw is None:
        return None
    _, tensors = events.decode_bundle(raw)
    return next(iter(tensors.values()), None)


async def compare(settings: Settings, origins: dict[str, str], version: str, name: str,
                  timeout: float = 120.0) -> tuple[dict[str, Any], str]:
    """Wait (bounded) for the replays' results, compare them with the originals' rows, and
    write the report to S3. Returns (report, its s3:// URI)."""
    store = ObjectStore(settings)
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        query = "SELECT * FROM inference_results WHERE request_id = ANY($1::text[])"
        deadline = time.monotonic() + timeout
        while True:
            replays = {r["request_id"]: r for r in await conn.fetch(query, list(origins))}
            if len(replays) >= len(origins) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        originals = {r["request_id"]: r for r in await conn.fetch(query, list(origins.values()))}
    finally:
        await conn.close()
    pairs = []
    for rid, oid in origins.items():
        if rid in replays and oid in originals:
            o, r = originals[oid], replays[rid]
            pairs.append(Pair(
                oid, rid, o["status"], r["status"], await _first_output(o, store), await _first_output(r, store),
                json.loads(o["timings_ms"]).get("total"), json.loads(r["timings_ms"]).get("total"),
            ))
    report = compare_pairs(pairs, version)
    report["missing_replays"] = sorted(rid for rid in origins if rid not in replays)
    report["missing_originals"] = sorted(oid for oid in origins.values() if oid not in originals)
    uri = await store.aput(f"reports/replay/{name}.json", orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report, uri
