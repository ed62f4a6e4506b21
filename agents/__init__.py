"""The worker's Faust agents: one line each. A stage's logic is the `step` of a stage of
`streams.worker.pipeline.Pipeline` (`intake`, `inference`, `sink`, `batch_jobs`);
`agents.common.register_stage` runs it on its topic."""

from __future__ import annotations

import faust

from agents.common import register_stage
from streams.worker.pipeline import Pipeline


def register_agents(app: faust.App, pipeline: Pipeline, serve: list[str]) -> None:
    s, topics = pipeline.settings, pipeline.topics
    batch_wait_s = s.max_batch_delay_ms / 1000
    # requests → admitted, served in place or routed to a model topic (bad events → dead letters)
    register_stage(app, pipeline, "intake", "intake", topics.requests, s.request_partitions,
                   pipeline.intake.step, s.take_max, batch_wait_s)
    for model in serve:  # model topic → micro-batched inference → replies
        register_stage(app, pipeline, f"infer-{model}", "inference", topics.model(model), s.model_partitions,
                       pipeline.inference.step, s.take_max, batch_wait_s)
    # results → PostgreSQL, in batches
    register_stage(app, pipeline, "results-sink", "sink", topics.results, s.result_partitions,
                   pipeline.sink.step, s.sink_batch_size, s.sink_max_delay_ms / 1000)
    # batch job commands, one at a time: a batch holds its command until its output is written
    register_stage(app, pipeline, "batches", "batches", topics.batches, s.request_partitions,
                   pipeline.batch_jobs.step, 1, 1.0)
