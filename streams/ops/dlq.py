"""Dead letters: list and show the dead-letter topic's events, and redrive selected ones to their
source topic (original bytes, key and headers) once their cause is fixed.

The topic is read by a consumer of our own (assigned partitions, no group). A redrive is recorded
per dead-letter offset in PostgreSQL (table `deadletter_redrives`, see `streams.storage.schema`),
in the transaction that holds the redrive lock, so running it twice does not send twice; the
pipeline is idempotent by request id should a crash between send and commit re-send one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg
import urllib3.exceptions
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from minio.error import MinioException
from pydantic import ValidationError

from streams.kafka.offsets import fixed_ends
from streams.settings import Settings
from streams.storage.objects import ObjectStore
from streams.worker.deadletters import object_key
from topics import events
from topics.errors import ErrorCode, EventError, printable
from topics.events import DeadLetter
from topics.names import Topics, valid_topic

_LOCK_ID = 0x1F5E_D1  # advisory lock: one redrive at a time
PREVIEW_BYTES = 200


@dataclass
class Letter:
    """A dead letter as stored: its position in the dead-letter topic and the original's key
    and headers (the dead letter carries them, less credentials)."""

    partition: int
    offset: int
    key: bytes | None
    headers: list[tuple[str, bytes]]
    letter: DeadLetter

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"


@dataclass
class Unreadable:
    """A record on the dead-letter topic that is no dead letter (anyone may produce there):
    listed with a preview, never redriven."""

    partition: int
    offset: int
    problem: str
    preview: str

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"


Record = Letter | Unreadable


@dataclass
class Skipped:
    """A record a redrive did not send, and why."""

    record: Record
    why: str


class StoreUnreachable(Exception):
    """S3 did not answer while reading a dead letter's original."""


def parse(partition: int, offset: int, key: bytes | None, headers: list[tuple[str, bytes]],
          value: bytes | None) -> Record:
    """The record as a dead letter, or as Unreadable with the reason: never raises."""
    if not value:
        return Unreadable(partition, offset, "no value (tombstone)" if value is None else "empty value", "")
    try:
        letter = events.decode_dead_letter(value)
    except ValidationError as error:
        return Unreadable(partition, offset, f"not a dead letter: {events.problems(error, most=3)}",
                          printable(value[:PREVIEW_BYTES].decode(errors="replace")))
    return Letter(partition, offset, key, headers, letter)


def select(records: Iterable[Record], *, positions: set[tuple[int, int]] | None = None,
           reasons: set[str] | None = None) -> list[Record]:
    """The records at these (partition, offset) positions and/or the letters with these reasons;
    every record when neither is given."""
    return [
        record for record in records
        if (positions is None or (record.partition, record.offset) in positions)
        and (reasons is None or (isinstance(record, Letter) and record.letter.reason.value in reasons))
    ]


def unsendable(topics: Topics, letter: DeadLetter) -> str | None:
    """Why the letter must not be redriven to its source topic. Anyone may produce to the
    dead-letter topic, so a letter is trusted no further than the pipeline would have written it:
    only the topics the pipeline consumes are sources (and `original_of` reads originals only from
    where the pipeline stores them)."""
    source = letter.source_topic
    if source not in (topics.requests, topics.results, topics.batches) and not (
        source.startswith(topics.model("")) and valid_topic(source)
    ):
        return f"source topic {source!r} is not one the pipeline consumes"
    return None


async def original_of(store: ObjectStore, letter: DeadLetter) -> bytes:
    """The letter's original event: inline, or read from S3 where the pipeline writes originals.
    Raises EventError when it was not kept, is not there or is not whole, StoreUnreachable when
    S3 does not answer."""
    if letter.original_ref is None:
        try:
            original = letter.original
        except ValueError as exc:
            raise EventError(ErrorCode.PAYLOAD_UNAVAILABLE, str(exc)) from None
    else:
        expected = store.uri(object_key(letter.source_topic, letter.source_partition, letter.source_offset))
        if letter.original_ref != expected:
            raise EventError(ErrorCode.PAYLOAD_UNAVAILABLE, f"{letter.original_ref} is not where originals are stored")
        try:
            original = await store.aget(letter.original_ref)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnreachable(f"cannot read {letter.original_ref}: S3 is unreachable ({exc})") from exc
    if letter.original_bytes is not None and len(original) != letter.original_bytes:
        raise EventError(ErrorCode.PAYLOAD_UNAVAILABLE,
                         f"the original is {len(original)} bytes, the letter says {letter.original_bytes}")
    return original


async def describe(store: ObjectStore, record: Record) -> dict[str, Any]:
    """The dead letter with its original event decoded (the request header, less credentials), as
    far as it decodes; an unreadable record with its problem and a preview."""
    if isinstance(record, Unreadable):
        return {"position": record.position, "unreadable": record.problem, "preview": record.preview}
    body = {"position": record.position, **record.letter.model_dump(mode="json", exclude={"original_b64"})}
    try:
        original = await original_of(store, record.letter)
    except (EventError, StoreUnreachable) as error:
        body["original_error"] = str(error)
        return body
    try:
        header, _ = events.decode_request_header(original)
        body["original"] = header.model_dump(mode="json", exclude_none=True, exclude={"credentials"})
    except EventError as error:
        body["original_error"] = str(error)
        body["original_preview"] = printable(original[:PREVIEW_BYTES].decode(errors="replace"))
    return body


async def read_letters(settings: Settings) -> list[Record]:
    """Every record on the dead-letter topic now, in partition and offset order."""
    topic = Topics(settings.topic_prefix).deadletter
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # a topic created just now
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await fixed_ends(consumer, tps)
        await consumer.seek_to_beginning(*tps)
        letters: list[Record] = []
        active = {tp: end for tp, end in ends.items() if await consumer.position(tp) < end}
        while active:
            for tp, records in (await consumer.getmany(*active, timeout_ms=500)).items():
                letters += [_record(r) for r in records if r.offset < active[tp]]
            for tp in list(active):
                if await consumer.position(tp) >= active[tp]:
                    del active[tp]
        return sorted(letters, key=lambda letter: (letter.partition, letter.offset))
    finally:
        await consumer.stop()


def _record(record: ConsumerRecord) -> Record:
    return parse(record.partition, record.offset, record.key, list(record.headers or ()), record.value)


async def redrive(settings: Settings, records: list[Record]) -> tuple[list[Letter], list[Skipped]]:
    """Send each letter's original event back to its source topic, unless it was redriven before.
    Unreadable records, originals S3 no longer has and originals over the message limit are
    skipped. Returns (sent, skipped with why). Raises StoreUnreachable when S3 does not answer,
    once the letters sent before are confirmed and recorded."""
    topics = Topics(settings.topic_prefix)
    topic = topics.deadletter
    store = ObjectStore(settings)
    skipped = [Skipped(r, f"unreadable: {r.problem}") for r in records if isinstance(r, Unreadable)]
    letters = [r for r in records if isinstance(r, Letter)]
    sent: list[Letter] = []
    outage: StoreUnreachable | None = None
    conn = await asyncpg.connect(settings.postgres_dsn)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                max_request_size=settings.max_message_bytes + 64 * 1024)
    await producer.start()
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            done = {(r["partition"], r["offset"]) for r in await conn.fetch(
                'SELECT partition, "offset" FROM deadletter_redrives WHERE topic = $1', topic)}
            sends = []
            for letter in letters:
                if (letter.partition, letter.offset) in done:
                    skipped.append(Skipped(letter, "redriven before"))
                    continue
                if why := unsendable(topics, letter.letter):
                    skipped.append(Skipped(letter, why))
                    continue
                try:
                    original = await original_of(store, letter.letter)
                except EventError as error:
                    skipped.append(Skipped(letter, f"original unavailable: {error.message}"))
                    continue
                except StoreUnreachable as exc:
                    outage = exc
                    break
                if len(original) > settings.max_message_bytes:
                    skipped.append(Skipped(letter, f"original is {len(original)} bytes, over the message limit"))
                    continue
                sends.append(await producer.send(letter.letter.source_topic, original, key=letter.key,
                                                 headers=letter.headers))
                sent.append(letter)
            for future in sends:
                await future  # recorded only once the broker confirmed every send
            await conn.executemany(
                'INSERT INTO deadletter_redrives (topic, partition, "offset", source_topic, request_id)'
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                [(topic, x.partition, x.offset, x.letter.source_topic, x.letter.request_id) for x in sent],
            )
    finally:
        await producer.stop()
        await conn.close()
    if outage is not None:
        raise StoreUnreachable(f"{outage}; {len(sent)} letters were redriven before it, run again once S3 is back")
    return sent, skipped
