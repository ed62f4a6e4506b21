"""Inference agents, one per served model: model topic → micro-batched onnxruntime → replies."""

from __future__ import annotations

import faust

from agents.common import process, start
from streams.pipeline import Pipeline


def register(app: faust.App, pipeline: Pipeline, model: str) -> None:
    s = pipeline.settings
    topic = app.topic(pipeline.topics.model(model), partitions=s.model_partitions)

    async def infer(stream: faust.StreamT) -> None:
        await start(pipeline)
        async for batch in stream.take_events(s.take_max, within=s.max_batch_delay_ms / 1000):  # type: ignore[attr-defined]
            await process(app, pipeline, "inference", pipeline.infer, batch)

    app.agent(topic, name=f"infer-{model}")(infer)
