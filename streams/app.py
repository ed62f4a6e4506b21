"""The Faust application of a worker: its settings, and which agents it runs."""

from __future__ import annotations

import asyncio
import logging

import faust
import redis.asyncio as aioredis

from agents import batches, inference, intake, sink
from streams.gatekeeper import Gatekeeper
from streams.kafka_transport import broker_url
from streams.pipeline import Pipeline
from streams.registry import ModelRegistry
from streams.registry_store import RegistryStore
from streams.results_store import ResultsStore
from streams.settings import Settings
from topics.admin import ensure_topics


async def bootstrap_registry(settings: Settings) -> list[str]:
    """Register the built models that the registry lacks, republish every record (so a new
    registry topic starts complete), and return the model names to serve."""
    results = ResultsStore(settings.postgres_dsn)
    await results.start()  # creates or migrates the schema
    redis = aioredis.from_url(settings.redis_url)
    try:
        store = RegistryStore(settings, results.pool, redis)
        await ensure_topics(settings, [])
        await store.register_repository(settings.model_repository)
        records = await store.list()
        await store.publish(records)
        names = sorted({r.name for r in records if r.status != "retired"})
        serve = [n for n in names if n in settings.models] if settings.models else names
        await ensure_topics(settings, serve)
    finally:
        await redis.aclose()
        await results.stop()
    return serve


def create_app(settings: Settings, serve: list[str]) -> tuple[faust.App, Pipeline]:
    if not serve:
        raise FileNotFoundError(f"no models to serve; run `inferstream models build` (repository: "
                                f"{settings.model_repository})")
    pipeline = Pipeline(settings, ModelRegistry(), serve=serve, gatekeeper=Gatekeeper(settings))
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
        # On stop, let in-flight batches finish and be acknowledged before the agents are
        # cancelled: a cancelled take_events batch is acknowledged by Faust's own `finally`,
        # and the final commit would then skip events that were never processed.
        stream_wait_empty=True,
        # Throughput: big fetches and produce batches, no per-event waits.
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
    for model in serve:
        inference.register(app, pipeline, model)
    sink.register(app, pipeline)
    batches.register(app, pipeline)
    return app, pipeline


def run_worker(settings: Settings) -> None:
    """Run a worker in the foreground until SIGINT/SIGTERM."""
    loop = asyncio.new_event_loop()  # Faust runs on the current loop
    asyncio.set_event_loop(loop)
    serve = loop.run_until_complete(bootstrap_registry(settings))
    app, _ = create_app(settings, serve)
    if settings.metrics_port > 0:
        from streams.scaling import serve_lag_metrics

        serve_lag_metrics(app, settings)
    worker = faust.Worker(app, loglevel=settings.log_level)
    # Faust's terminal spinner sets the root logger to DEBUG, which makes every debug record of
    # faust and aiokafka cost CPU; keep the root at the configured level.
    logging.getLogger().setLevel(settings.log_level.upper())
    worker.execute_from_commandline()
