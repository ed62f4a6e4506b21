"""Dead letters: list and show the dead-letter topic's events, and redrive selected ones to their
source topic (original bytes, key and headers) once their cause is fixed.

The topic is read by a consumer of our own (assigned partitions, no group). A redrive is recorded
per dead-letter offset in PostgreSQL, in the transaction that holds the redrive lock, so running
it twice does not send twice; the pipeline is idempotent by request id should a crash between
send and commit re-send one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.replay import fixed_ends
from streams.settings import Settings
from topics import events
from topics.errors import EventError
from topics.events import DeadLetter
from topics.names import Topics

REDRIVES_DDL = """
CREATE TABLE IF NOT EXISTS deadletter_redrives (
    topic        text NOT NULL,
    partition    integer NOT NULL,
    "offset"     bigint NOT NULL,
    source_topic text NOT NULL,
    request_id   text,
    redriven_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
)
"""
_LOCK_ID = 0x1F5E_D1  # advisory lock: one redrive at a time


@dataclass
class Letter:
    """A dead letter as stored: its position in the dead-letter topic and the original's key
    and headers (the dead letter carries them unchanged)."""

    partition: int
    offset: int
    key: bytes | None
    headers: list[tuple[str, bytes]]
    letter: DeadLetter

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"


def select(letters: Iterable[Letter], *, positions: set[tuple[int, int]] | None = None,
           reasons: set[str] | None = None) -> list[Letter]:
    """The letters at these (partition, offset) positions and/or with these reasons; every
    letter when neither is given."""
    return [
        letter for letter in letters
        if (positions is None or (letter.partition, letter.offset) in positions)
        and (reasons is None or letter.letter.reason.value in reasons)
    ]


def describe(letter: Letter) -> dict[str, Any]:
    """The dead letter with its original event decoded (the request header), as far as it decodes."""
    body = letter.letter.model_dump(mode="json", exclude={"original_b64"})
    try:
        header, _ = events.decode_request_header(letter.letter.original)
        body["original"] = header.model_dump(mode="json", exclude_none=True, exclude={"credentials"})
    except EventError as error:
        body["original_error"] = str(error)
        body["original_preview"] = letter.letter.original[:200].decode(errors="replace")
    return body


async def read_letters(settings: Settings) -> list[Letter]:
    """Every dead letter stored now, in partition and offset order."""
    topic = Topics(settings).deadletter
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # a topic created just now
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = await fixed_ends(consumer, tps)
        await consumer.seek_to_beginning(*tps)
        letters: list[Letter] = []
        active = {tp: end for tp, end in ends.items() if await consumer.position(tp) < end}
        while active:
            for tp, records in (await consumer.getmany(*active, timeout_ms=500)).items():
                letters += [_letter(r) for r in records if r.offset < active[tp]]
            for tp in list(active):
                if await consumer.position(tp) >= active[tp]:
                    del active[tp]
        return sorted(letters, key=lambda letter: (letter.partition, letter.offset))
    finally:
        await consumer.stop()


def _letter(record) -> Letter:
    return Letter(record.partition, record.offset, record.key, list(record.headers or ()),
                  events.decode_dead_letter(record.value))


async def redrive(settings: Settings, letters: list[Letter]) -> tuple[list[Letter], list[Letter]]:
    """Send each letter's original event back to its source topic, unless it was redriven
    before. Returns (sent, already redriven)."""
    topic = Topics(settings).deadletter
    conn = await asyncpg.connect(settings.postgres_dsn)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                max_request_size=settings.max_message_bytes + 64 * 1024)
    await producer.start()
    try:
        await conn.execute(REDRIVES_DDL)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            done = {(r["partition"], r["offset"]) for r in await conn.fetch(
                'SELECT partition, "offset" FROM deadletter_redrives WHERE topic = $1', topic)}
            todo = [letter for letter in letters if (letter.partition, letter.offset) not in done]
            sends = [await producer.send(letter.letter.source_topic, letter.letter.original, key=letter.key,
                                         headers=letter.headers) for letter in todo]
            for sent in sends:
                await sent  # recorded only once the broker confirmed every send
            await conn.executemany(
                'INSERT INTO deadletter_redrives (topic, partition, "offset", source_topic, request_id)'
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                [(topic, x.partition, x.offset, x.letter.source_topic, x.letter.request_id) for x in todo],
            )
    finally:
        await producer.stop()
        await conn.close()
    return todo, [letter for letter in letters if (letter.partition, letter.offset) in done]
