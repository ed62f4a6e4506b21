"""Replay stored request events: read a topic by time range and/or offsets with a consumer of our
own (assigned partitions, no group, so the live groups' committed offsets are never touched),
filter the requests, and re-publish copies to the pipeline, to one model version or to another
topic.

A copy gets a deterministic id (`replay-<name>-<partition>-<offset>`), carries its origin
(`replay_of`) and answers no caller: its result is stored beside the original's, and a resumed
or repeated replay only rewrites the same rows. The checkpoint (next offset per partition) is
written only after the broker confirmed the sends, so a crash re-sends at most the same ids.

Publishing is batched and pipelined: a chunk of stored events becomes one record batch per target
partition (`create_batch`/`send_batch`: one delivery future per batch, not per event); the next
chunk is read and sent while earlier ones await their acknowledgements (at most
`CHUNKS_IN_FLIGHT`), and the checkpoint moves, in order, past a chunk once every batch holding
its copies is confirmed. A copy is built from the stored frame: the header is validated (filters)
and its tensors checked, then only the header is rewritten; the tensor payload is passed on
unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from pydantic import ValidationError

from streams.kafka.offsets import fixed_ends
from streams.settings import Settings
from streams.storage.objects import ObjectStore
from streams.storage.results import ResultsStore
from topics import events
from topics import tensors as tensor_codec
from topics.errors import ErrorCode, EventError
from topics.events import InferenceRequest, ReplayOrigin
from topics.names import Topics

DIFF_TOLERANCE = 1e-6  # outputs further apart than this count as differing

# Publishing. The local broker on S3 storage writes an object per record batch: few large
# batches (bench/replay.py: ~7k events/s with aiokafka's 16 KiB batches, 40k+ with 256 KiB+).
# 512 KiB stays under Apache Kafka's default 1 MiB message.max.bytes.
PUBLISH_BATCH_BYTES = 512 * 1024
# Reading. Asked for at least this much, the local broker on S3 storage answers a fetch with
# many stored batches instead of one per partition (bench/replay.py: ~2-6k events/s read with
# fetch_min_bytes=1, 30k+ with 256 KiB). A replay reads stored data: the wait is only paid by
# the last fetches of a range.
FETCH_MIN_BYTES = 512 * 1024
FETCH_MAX_WAIT_MS = 100
CHUNK_RECORDS = 4000  # stored events read (from what the consumer has fetched) per chunk
CHUNKS_IN_FLIGHT = 3  # chunks sent whose acknowledgements are still awaited
YIELD_EVERY = 64  # records copied between turns of the event loop (the client's fetches and sends)


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


def copy_changes(request_id: str, name: str, topic: str, partition: int, offset: int,
                 version: str | None = None) -> dict[str, Any]:
    """What a copy changes in the stored request: a new deterministic id, its origin, no caller
    to answer, no deadline (the original's has passed), no batch (a batch's output must not gain
    rows), nothing mirrored, and the version asked for (else the original's)."""
    changes: dict[str, Any] = dict.fromkeys(("reply_to", "correlation_id", "deadline_ms", "batch_id", "shadow_of"))
    changes |= {"request_id": replay_id(name, partition, offset), "created_ms": events.now_ms(),
                "replay_of": ReplayOrigin(topic=topic, partition=partition, offset=offset, request_id=request_id)}
    if version:
        changes["version"] = version
    return changes


def replay_copy(request: InferenceRequest, name: str, topic: str, partition: int, offset: int,
                version: str | None = None) -> InferenceRequest:
    """The copy to publish, as a request."""
    return request.model_copy(update=copy_changes(request.request_id, name, topic, partition, offset, version))


def stored_request(raw: bytes) -> tuple[InferenceRequest, dict[str, Any], memoryview]:
    """A stored request event's validated header, its header as stored, and its tensor payload.
    Raises EventError where `events.decode_request` would: the tensors are checked against the
    payload, not copied out of it."""
    header, payload = events.unframe(raw)
    try:
        request = InferenceRequest.model_validate(header)
    except ValidationError as exc:
        raise EventError(ErrorCode.INVALID_SCHEMA, events.problems(exc)) from None
    if all(spec.data is None for spec in request.inputs):
        tensor_codec.unpack([{"name": s.name, "dtype": s.dtype, "shape": s.shape, "offset": s.offset,
                              "nbytes": s.nbytes} for s in request.inputs], payload)
    else:  # tensors inline as JSON lists: rare, the general decoder checks them
        events.decode_request(raw)
    return request, header, payload


def copy_event(request: InferenceRequest, header: dict[str, Any], payload: memoryview, name: str, topic: str,
               partition: int, offset: int, version: str | None = None) -> tuple[str, bytes]:
    """(replay id, encoded copy): `replay_copy`'s event, built from the stored header
    (`stored_request`) with the stored tensor payload passed on as it is, in the binary framing
    (tensors sent inline as JSON lists stay in the header)."""
    changes = copy_changes(request.request_id, name, topic, partition, offset, version)
    changes["replay_of"] = changes["replay_of"].model_dump()
    body = {k: v for k, v in {**header, **changes}.items() if v is not None}
    return changes["request_id"], events.frame(body, bytes(payload))


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
        topics = Topics(settings.topic_prefix)
        self.settings = settings
        self.job = job
        self.topic = job.topic or topics.requests
        self.target = job.target or topics.requests
        self.checkpoint = Checkpoint(settings.state_dir / "replay", job.name)
        self.progress = Progress()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
            fetch_min_bytes=FETCH_MIN_BYTES, fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
            max_batch_size=PUBLISH_BATCH_BYTES, max_request_size=settings.max_message_bytes + 64 * 1024,
        )
        self._results: ResultsStore | None = None  # when a filter needs the stored results
        self._partitioner = DefaultPartitioner()  # what `send(key=...)` uses: keys keep their partitions
        self._partitions: list[int] = []  # the target's

    async def run(self, on_progress: Callable[[Progress], None] = lambda _: None) -> Progress:
        await self._consumer.start()
        try:
            if not self.job.dry_run:
                await self._producer.start()
            if self.job.filters.needs_results:
                self._results = ResultsStore(self.settings.postgres_dsn)
                await self._results.start()
            await self._replay(await self._ranges(), on_progress)
        finally:
            if self._results is not None:
                await self._results.stop()
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
        if not self.job.dry_run:
            self._partitions = sorted(await self._producer.partitions_for(self.target))
        # Chunks sent, oldest first: their batches' delivery futures and the checkpoint after them.
        unconfirmed: deque[tuple[list[asyncio.Future[Any]], dict[int, int]]] = deque()
        on_progress(self.progress)
        while active and not self._limit_reached():
            records = await self._read_chunk(active)
            sent = await self._publish(records, next_offsets)
            if not self.job.dry_run:
                unconfirmed.append((sent, dict(next_offsets)))
                await self._confirm(unconfirmed, keep=CHUNKS_IN_FLIGHT)
            on_progress(self.progress)
        await self._confirm(unconfirmed, keep=0)

    async def _read_chunk(self, active: dict[TopicPartition, int]) -> list[ConsumerRecord]:
        """Up to CHUNK_RECORDS records (about a second's worth at a set rate, so the checkpoint
        keeps moving) of the ranges still open: waits (bounded) for the first, then takes what the
        consumer has already fetched. Closes the ranges read to their end."""
        size = CHUNK_RECORDS if not self.job.rate else max(1, min(CHUNK_RECORDS, int(self.job.rate)))
        records: list[ConsumerRecord] = []
        while active and len(records) < size:
            batches = await self._consumer.getmany(*active, timeout_ms=0 if records else 500,
                                                   max_records=size - len(records))
            records += [r for tp, rs in batches.items() for r in rs if r.offset < active[tp]]
            for tp in list(active):
                if await self._consumer.position(tp) >= active[tp]:
                    del active[tp]
                    self._consumer.pause(tp)
            if not batches:
                break
        return records

    async def _confirm(self, unconfirmed: deque[tuple[list[asyncio.Future[Any]], dict[int, int]]],
                       keep: int) -> None:
        """Wait for the oldest chunks' acknowledgements until at most `keep` remain unconfirmed
        (taking along any already confirmed), and move the checkpoint past the last one
        confirmed. A failed send raises here; the checkpoint stays before its chunk."""
        confirmed = None
        try:
            while unconfirmed and (len(unconfirmed) > keep or all(f.done() for f in unconfirmed[0][0])):
                await asyncio.gather(*unconfirmed[0][0])
                confirmed = unconfirmed.popleft()[1]
        finally:
            if confirmed is not None:
                self.checkpoint.save(confirmed)

    def _in_time_range(self, timestamp: int) -> bool:
        """Checked per record: the local broker (Tansu) answers offsets_for_times per record
        batch, so its offsets only narrow where reading starts."""
        return ((self.job.since_ms is None or timestamp >= self.job.since_ms)
                and (self.job.until_ms is None or timestamp < self.job.until_ms))

    def _limit_reached(self) -> bool:
        return self.job.max_events is not None and self.progress.published >= self.job.max_events

    async def _publish(self, records: list[ConsumerRecord], next_offsets: dict[int, int]) -> list[asyncio.Future[Any]]:
        """Send copies of the matching records, in order, as one record batch per target
        partition (more when one fills up); the delivery futures of the batches sent.
        `next_offsets` advances past every record handled (matching or not)."""
        stored = await self._stored_results(records)
        open_batches: dict[int, BatchBuilder] = {}
        sent: list[asyncio.Future[Any]] = []
        for handled, record in enumerate(records, 1):
            if self._limit_reached():
                break
            if handled % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let the client fetch the next records and send what is batched
            self.progress.read += 1
            next_offsets[record.partition] = record.offset + 1
            if not self._in_time_range(record.timestamp):
                continue
            try:
                request, header, payload = stored_request(record.value)
            except EventError:
                self.progress.undecodable += 1
                continue
            if not self.job.filters.match(request, stored.get(request.request_id)):
                continue
            copy_id, value = copy_event(request, header, payload, self.job.name, self.topic, record.partition,
                                        record.offset, self.job.version)
            if not self.job.dry_run:
                if self.job.rate:
                    await self._pace(open_batches, sent)
                await self._append(open_batches, sent, copy_id.encode(), value)
            self.progress.published += 1
            self.progress.origins[copy_id] = request.request_id
        await self._send_open(open_batches, sent)
        return sent

    async def _append(self, open_batches: dict[int, BatchBuilder], sent: list[asyncio.Future[Any]],
                      key: bytes, value: bytes) -> None:
        """Add a copy to its partition's open batch; a full batch is sent and a new one opened."""
        partition = self._partitioner(key, self._partitions, self._partitions)
        batch = open_batches.get(partition)
        if batch is None:
            batch = open_batches[partition] = self._producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:
            sent.append(await self._send(batch, partition))
            batch = open_batches[partition] = self._producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)  # an empty batch takes any record

    async def _send_open(self, open_batches: dict[int, BatchBuilder], sent: list[asyncio.Future[Any]]) -> None:
        for partition, batch in open_batches.items():
            sent.append(await self._send(batch, partition))
        open_batches.clear()

    async def _send(self, batch: BatchBuilder, partition: int) -> asyncio.Future[Any]:
        batch.close()
        return await self._producer.send_batch(batch, self.target, partition=partition)

    async def _pace(self, open_batches: dict[int, BatchBuilder], sent: list[asyncio.Future[Any]]) -> None:
        """Hold to `rate`; what is batched goes out before waiting, so paced copies leave at their pace."""
        delay = self.progress.started + self.progress.published / (self.job.rate or 1.0) - time.monotonic()
        if delay > 0:
            await self._send_open(open_batches, sent)
            await asyncio.sleep(delay)

    async def _stored_results(self, records: list[ConsumerRecord]) -> dict[str, dict[str, Any]]:
        """The result rows (status, tenant) of these records' requests, when a filter needs them."""
        if self._results is None or not records:
            return {}
        ids = []
        for record in records:
            try:
                ids.append(events.decode_request_header(record.value)[0].request_id)
            except EventError:
                continue
        return {request_id: dict(row) for request_id, row in (await self._results.outcomes(ids)).items()}


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
    async with ResultsStore(settings.postgres_dsn) as results:
        replays = await results.wait_until_stored(list(origins), timeout_s=timeout)
        originals = await results.rows(list(origins.values()))
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
