"""Results sink agent: results topic → PostgreSQL, in batches."""

from __future__ import annotations

import faust

from agents.common import process, start
from streams.pipeline import Pipeline


def register(app: faust.App, pipeline: Pipeline) -> None:
    s = pipeline.settings
    topic = app.topic(pipeline.topics.results, partitions=s.result_partitions)

    @app.agent(topic, name="results-sink")
    async def sink(stream: faust.StreamT) -> None:
        await start(pipeline)
        async for batch in stream.take_events(s.sink_batch_size, within=s.sink_max_delay_ms / 1000):  # type: ignore[attr-defined]
            await process(app, pipeline, "sink", pipeline.sink, batch)
