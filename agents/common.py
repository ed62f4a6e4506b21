"""Glue shared by the agents: Faust events to plain messages, an outbox on Faust's producer, and
the error policy around each step."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import asyncpg
import faust
import urllib3.exceptions
from aiokafka.errors import KafkaError
from minio.error import MinioException

from streams import tracing
from streams.metrics import STEP_RETRIES
from streams.pipeline import Headers, Message, Outbox, Pipeline
from topics.errors import ErrorCode, EventError

log = logging.getLogger(__name__)

# Failures of a service (broker, PostgreSQL, S3) rather than of the data: wait and retry the
# batch, however long it takes; acknowledging would lose the events.
TRANSIENT = (
    OSError, asyncio.TimeoutError, KafkaError, asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError, asyncpg.CannotConnectNowError, MinioException, urllib3.exceptions.HTTPError,
)
ATTEMPTS_BEFORE_ISOLATING = 3
MAX_BACKOFF_S = 10.0

def backoff(failures: int) -> float:
    return min(MAX_BACKOFF_S, 0.5 * 2 ** min(failures, 5))


Step = Callable[[Sequence[Message], Outbox], Awaitable[None]]


def to_messages(batch: Sequence[faust.EventT]) -> list[Message]:
    out = []
    for event in batch:
        m = event.message
        headers = cast(Headers, list(m.headers.items()) if isinstance(m.headers, dict) else list(m.headers or []))
        timestamp_ms = int(m.timestamp * 1000) if m.timestamp else None
        # A tombstone (no value) is an empty, undecodable event: dead-lettered, not dropped.
        out.append(Message(m.value or b"", m.key, m.topic, m.partition, m.offset, headers, timestamp_ms))
    return out


def outbox(app: faust.App) -> Outbox:
    async def send(topic: str, key: bytes | None, value: bytes, headers: Headers | None):
        # The producer's own future: appended to its batches now, confirmed on flush.
        return await app.producer.send(topic, key, value, None, None, headers)

    return Outbox(send)


async def start(pipeline: Pipeline) -> None:
    """Start the pipeline's connections, waiting out services that are not up yet."""
    failures = 0
    while True:
        try:
            await pipeline.start()
            return
        except TRANSIENT as exc:
            failures += 1
            log.warning("services not reachable yet (%r); retrying", exc)
            await asyncio.sleep(backoff(failures))


async def run_step(app: faust.App, pipeline: Pipeline, stage: str, step: Step, messages: Sequence[Message]) -> None:
    """Run one agent step until it succeeds. Service outages are retried with backoff; an
    unexpected error that persists is narrowed down to the messages that cause it, which are
    dead-lettered (INTERNAL) so that one poison event cannot stall a partition."""
    failures = 0
    while True:
        try:
            await step(messages, outbox(app))
            return
        except TRANSIENT as exc:
            failures += 1
            STEP_RETRIES.labels(stage).inc()
            delay = backoff(failures)
            log.warning("%s: service unavailable (%r); retrying %d events in %.1f s",
                        step.__name__, exc, len(messages), delay)
            await asyncio.sleep(delay)
        except Exception as exc:  # noqa: BLE001 - a bug or a poison event; see below
            failures += 1
            STEP_RETRIES.labels(stage).inc()
            log.exception("%s failed on %d events (attempt %d)", step.__name__, len(messages), failures)
            if failures < ATTEMPTS_BEFORE_ISOLATING:
                continue
            if len(messages) == 1:
                await _dead_letter(app, pipeline, stage, messages[0], exc)
                return
            for message in messages:
                await run_step(app, pipeline, stage, step, [message])
            return


async def _dead_letter(app: faust.App, pipeline: Pipeline, stage: str, message: Message, exc: Exception) -> None:
    box = outbox(app)
    error = EventError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    span = tracing.start_span(stage, message.headers)
    try:
        await pipeline.reject(box, message, error, None, stage, span)
    finally:
        span.end()
    await box.flush()
