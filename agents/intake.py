"""Intake agent: requests topic → per-model topics (bad events → dead letters)."""

from __future__ import annotations

import faust

from agents.common import process, start
from streams.pipeline import Pipeline


def register(app: faust.App, pipeline: Pipeline) -> None:
    s = pipeline.settings
    topic = app.topic(pipeline.topics.requests, partitions=s.request_partitions)

    @app.agent(topic, name="intake")
    async def intake(stream: faust.StreamT) -> None:
        await start(pipeline)
        async for batch in stream.take_events(s.take_max, within=s.max_batch_delay_ms / 1000):  # type: ignore[attr-defined]
            await process(app, pipeline, "intake", pipeline.intake, batch)
