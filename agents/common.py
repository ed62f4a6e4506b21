"""The glue of every agent: a stage's topic read in chunks, Faust events to plain messages, an
outbox on Faust's producer, and the error policy (`streams.worker.failures`) around each step."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import faust

from streams.kafka.outbox import Headers, Outbox
from streams.telemetry import tracing
from streams.telemetry.metrics import STEP_RETRIES
from streams.worker.failures import MAX_MESSAGE_CHARS, Failure, backoff, classify
from streams.worker.message import Message
from streams.worker.pipeline import Pipeline
from topics.errors import ErrorCode, EventError

log = logging.getLogger(__name__)

Step = Callable[[Sequence[Message], Outbox], Awaitable[None]]


def register_stage(app: faust.App, pipeline: Pipeline, name: str, stage: str, topic: str, partitions: int,
                   step: Step, take: int, within_s: float) -> None:
    """One agent: `topic` read in chunks of up to `take` events (waiting up to `within_s` to fill
    one), each chunk run through `step` under the error policy and acknowledged once it returns."""

    async def run(stream: faust.StreamT) -> None:
        await start(pipeline)
        async for batch in stream.take_events(take, within=within_s):  # type: ignore[attr-defined]
            await process(app, pipeline, stage, step, batch)

    app.agent(app.topic(topic, partitions=partitions), name=name)(run)


def to_messages(batch: Sequence[faust.EventT]) -> list[Message]:
    out = []
    for event in batch:
        m = event.message
        timestamp_ms = int(m.timestamp * 1000) if m.timestamp else None
        # A tombstone (no value) is an empty, undecodable event: dead-lettered, not dropped.
        out.append(Message(m.value or b"", m.key, m.topic, m.partition, m.offset, clean_headers(m.headers),
                           timestamp_ms))
    return out


def clean_headers(raw: object) -> Headers:
    """Kafka headers as (str, bytes) pairs whatever a producer sent: a header without a value
    has an empty one, so nothing downstream meets a None."""
    pairs = raw.items() if isinstance(raw, dict) else raw or ()
    headers: Headers = []
    for key, value in pairs:  # type: ignore[attr-defined]
        name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
        headers.append((name, bytes(value) if isinstance(value, bytes | bytearray | memoryview) else b""))
    return headers


def outbox(app: faust.App) -> Outbox:
    # Record batches on the aiokafka producer that Faust's wraps (started with the app).
    return Outbox(app.producer._ensure_producer())  # type: ignore[attr-defined]


async def start(pipeline: Pipeline) -> None:
    """Start the pipeline's connections, waiting out services that are not up yet."""
    failures = 0
    while True:
        try:
            await pipeline.start()
            return
        except Exception as exc:
            if classify(exc) is not Failure.OUTAGE:
                raise
            failures += 1
            log.warning("services not reachable yet (%r); retrying", exc)
            await asyncio.sleep(backoff(failures))


async def process(app: faust.App, pipeline: Pipeline, stage: str, step: Step, batch: Sequence[faust.EventT]) -> None:
    """Run a step on a chunk of events, acknowledging them only if it returns.

    Faust's `take_events` acknowledges a chunk in a `finally`, also when the agent body raised
    or was cancelled mid-step. Each event holds one more reference until the step is done, so
    that acknowledgement does not release the events of a step that did not finish: their
    offsets are never committed, and they are read again after a restart or rebalance."""
    for event in batch:
        event.message.incref()
    await run_step(app, pipeline, stage, step, to_messages(batch))
    for event in batch:
        event.message.decref()


async def run_step(app: faust.App, pipeline: Pipeline, stage: str, step: Step, messages: Sequence[Message],
                   retry: bool = True) -> None:
    """Run one agent step until it succeeds. Outages are retried with backoff, for as long as
    they last. Any other error is a bug or a poison event the step could not pin on one event:
    the chunk is tried once more, then split in halves until the event that fails alone is found
    and dead-lettered (INTERNAL)."""
    outages = 0
    while True:
        try:
            await step(messages, outbox(app))
            return
        except Exception as exc:  # noqa: BLE001 - classified below
            STEP_RETRIES.labels(stage).inc()
            if pipeline.stopping:
                # The worker stops, closing stores and servers under the steps still running:
                # nothing failing now is the events' fault. No rejection, no retry: the events
                # stay unacknowledged, for the next owner of the partition.
                raise
            if classify(exc) is Failure.OUTAGE:
                outages += 1
                delay = backoff(outages)
                log.warning("%s: service unavailable (%r); retrying %d events in %.1f s",
                            step.__name__, exc, len(messages), delay)
                await asyncio.sleep(delay)
                continue
            log.exception("%s failed on %d events", step.__name__, len(messages))
            if retry:
                retry = False
                continue
            if len(messages) == 1:
                await _dead_letter(app, pipeline, stage, messages[0], exc)
                return
            half = len(messages) // 2
            await run_step(app, pipeline, stage, step, messages[:half], retry=False)
            await run_step(app, pipeline, stage, step, messages[half:], retry=False)
            return


async def _dead_letter(app: faust.App, pipeline: Pipeline, stage: str, message: Message, exc: Exception) -> None:
    """Dead-letter the event that fails alone; should even that fail for any reason but an
    outage, a letter without the original or a reply, which cannot fail on the event's data."""
    error = EventError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE_CHARS])
    span = tracing.start_span(stage, [])
    try:
        for bare in (False, True):
            box = outbox(app)
            try:
                if bare:
                    await pipeline.answers.dead_letter_bare(box, message, error)
                else:
                    await pipeline.answers.reject(box, message, error, None, stage, span)
                await box.flush()
                return
            except Exception as failure:  # noqa: BLE001 - classified: an outage retries the chunk
                if classify(failure) is Failure.OUTAGE or bare:
                    raise
                log.exception("dead-lettering %s failed; sending it without the original", message.source)
    finally:
        span.end()
