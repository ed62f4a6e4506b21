"""Batch agent: batch job commands → items fanned out as request events → output in S3."""

from __future__ import annotations

from collections.abc import Sequence

import faust

from agents.common import process, start
from streams import tracing
from streams.batches import BatchRunner
from streams.jobs import JobStore
from streams.outbox import Outbox
from streams.pipeline import Message, Pipeline
from topics.errors import EventError


def register(app: faust.App, pipeline: Pipeline) -> None:
    topic = app.topic(pipeline.topics.batches, partitions=pipeline.settings.request_partitions)

    async def run_batches(messages: Sequence[Message], box: Outbox) -> None:
        runner = BatchRunner(pipeline.settings, pipeline.registry, pipeline.store, JobStore(pipeline.results.pool))
        for message in messages:
            try:
                batch_id, owner = pipeline.batch_command(message)
            except EventError as error:
                span = tracing.start_span("batches", message.headers)
                await pipeline.reject(box, message, error, None, "batches", span, answer=False)
                span.end()
                continue
            await runner.run(batch_id, owner, box)
        await box.flush()

    # One command at a time: a batch holds its command until its output is written.
    @app.agent(topic, name="batches")
    async def batches(stream: faust.StreamT) -> None:
        await start(pipeline)
        async for batch in stream.take_events(1, within=1.0):  # type: ignore[attr-defined]
            await process(app, pipeline, "batches", run_batches, batch)
