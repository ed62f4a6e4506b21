"""The Faust application of a worker: its settings, and which agents it runs."""

from __future__ import annotations

import logging

import faust

from agents import batches, inference, intake, sink
from streams.kafka_transport import broker_url
from streams.pipeline import Pipeline
from streams.registry import ModelRegistry
from streams.settings import Settings


def create_app(settings: Settings) -> tuple[faust.App, Pipeline]:
    registry = ModelRegistry.load(settings.model_repository, settings.models or None)
    if not registry.names:
        raise FileNotFoundError(
            f"no models in {settings.model_repository}; run `inferstream models build`"
        )
    pipeline = Pipeline(settings, registry, serve=registry.names)
    (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=broker_url(settings.kafka_bootstrap, settings.kafka_fetch_max_wait_ms),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=str(settings.state_dir / "faust" / "{conf.id}"),
        topic_partitions=settings.model_partitions,
        # Faust's 60 s default makes each group join wait ~30 s.
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        # Throughput: big fetches and produce batches, no per-event waits.
        stream_wait_empty=False,
        stream_buffer_maxsize=16384,
        broker_max_poll_records=2000,
        consumer_max_fetch_size=4 * 1024 * 1024,
        producer_linger=0.005,
        producer_max_batch_size=256 * 1024,
        producer_max_request_size=settings.max_message_bytes + 64 * 1024,
        producer_acks=-1,
        web_enabled=False,
    )
    intake.register(app, pipeline)
    for model in pipeline.serve:
        inference.register(app, pipeline, model)
    sink.register(app, pipeline)
    batches.register(app, pipeline)
    return app, pipeline


def run_worker(settings: Settings) -> None:
    """Run a worker in the foreground until SIGINT/SIGTERM."""
    app, _ = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level)
    # Faust's terminal spinner sets the root logger to DEBUG, which makes every debug record of
    # faust and aiokafka cost CPU; keep the root at the configured level.
    logging.getLogger().setLevel(settings.log_level.upper())
    worker.execute_from_commandline()
