"""The Faust application of a worker: its settings, and which agents it runs."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable

import faust
import mode
import redis.asyncio as aioredis

from streams.gate.gatekeeper import Gatekeeper
from streams.kafka.admin import ensure_topics
from streams.kafka.faust_take import IdleFreeStream
from streams.kafka.faust_tuning import LeanMonitor, LeanTableManager, QuickExitWorker, tune_transport
from streams.kafka.fetch_wait import IdlePolicy, wake_channel
from streams.kafka.transport import broker_url
from streams.registry.records import ModelRegistry
from streams.registry.store import RegistryStore
from streams.settings import Settings, refuse_placeholder_secrets
from streams.storage.results import ResultsStore
from streams.storage.schema import migrate
from streams.telemetry import metrics
from streams.telemetry.logs import setup_logging
from streams.telemetry.model_stats import STATS
from streams.telemetry.presence import Heartbeat
from streams.telemetry.tracing import setup_tracing
from streams.worker.pipeline import Pipeline

log = logging.getLogger(__name__)

# A crashed worker that has not stopped this long after its crash exits at once: faust's stop can
# hang after a crash (its final commit awaits the consumer's thread, which the crash may already
# have stopped). Whatever it had not acknowledged is read again either way.
CRASH_STOP_DEADLINE_S = 10.0


async def bootstrap_registry(settings: Settings) -> list[str]:
    """Migrate the database, register the built models that the registry lacks, republish every
    record (so a new registry topic starts complete), and return the model names to serve."""
    await migrate(settings.postgres_dsn)
    results = ResultsStore(settings.postgres_dsn)
    await results.start()
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


class WorkerApp(faust.App):
    async def _on_agent_error(self, agent: faust.types.AgentT, exc: BaseException) -> None:
        """An agent whose body raised past the error policy stops the worker. The events it held
        stay unacknowledged (`agents.common.process`), and the restarted worker, or another of
        the group, reads them again; restarted in place, the agent would go on after them with
        their offsets never committed."""
        await super()._on_agent_error(agent, exc)
        log.critical("agent %s crashed (%r); stopping the worker so that its events are read again",
                     agent.name, exc)
        exit_unless_stopped_within(CRASH_STOP_DEADLINE_S)
        await self.crash(exc)

    def _new_transport(self) -> faust.types.TransportT:
        # Consumers drain fetched records without faust's per-event wait_first (streams.kafka.faust_tuning).
        return tune_transport(super()._new_transport())


def exit_unless_stopped_within(seconds: float, code: int = 1) -> None:
    """End the process with `code` in `seconds` unless it has ended by then. A daemon thread: an
    event loop that hangs cannot hold it, and it does not keep a process that ends in time."""

    def exit_now() -> None:
        log.critical("the worker did not stop within %.0f s of its crash; exiting", seconds)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


# The worker's Kafka client settings (bench/floor.py measures a plain client with the same).
HEARTBEAT_INTERVAL_S = 1  # at most; a third of the session timeout below 3 s
MAX_POLL_RECORDS = 2000
MAX_FETCH_BYTES = 4 * 1024 * 1024
LINGER_S = 0.005
MAX_BATCH_BYTES = 256 * 1024


def heartbeat_interval_s(settings: Settings) -> float:
    return min(HEARTBEAT_INTERVAL_S, settings.kafka_session_timeout_s / 3)


# Registers the worker's agents on its app (`agents.register_agents`; the CLI passes it in, so the
# worker's runtime does not depend on the glue built on it).
RegisterAgents = Callable[[faust.App, Pipeline, list[str]], None]


def create_app(settings: Settings, serve: list[str], register_agents: RegisterAgents) -> tuple[faust.App, Pipeline]:
    if not serve:
        raise FileNotFoundError(f"no models to serve; run `inferstream models build` (repository: "
                                f"{settings.model_repository})")
    pipeline = Pipeline(settings, ModelRegistry(), serve=serve, gatekeeper=Gatekeeper(settings))
    (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = WorkerApp(
        settings.app_id,
        # Fetch waits: short while records flow, slow polls woken by clients once idle (streams.kafka.fetch_wait).
        broker=broker_url(settings.kafka_bootstrap, settings.kafka_fetch_max_wait_ms,
                          IdlePolicy.from_settings(settings), (settings.redis_url, wake_channel(settings))),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        datadir=str(settings.state_dir / "faust" / "{conf.id}"),
        topic_partitions=settings.model_partitions,
        # Faust's 60 s default session timeout makes each group join on Tansu wait ~30 s.
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=heartbeat_interval_s(settings),
        # On stop, let in-flight batches finish and be acknowledged before the agents are
        # cancelled: a cancelled take_events batch is acknowledged by Faust's own `finally`,
        # and the final commit would then skip events that were never processed.
        stream_wait_empty=True,
        # Throughput: big fetches and produce batches, no per-event waits.
        stream_buffer_maxsize=16384,
        broker_max_poll_records=MAX_POLL_RECORDS,
        consumer_max_fetch_size=MAX_FETCH_BYTES,
        producer_linger=LINGER_S,
        producer_max_batch_size=MAX_BATCH_BYTES,
        producer_max_request_size=settings.max_message_bytes + 64 * 1024,
        producer_acks=-1,
        web_enabled=False,
        TableManager=LeanTableManager,  # no 1 s wait for tables at start (the worker has none)
        Monitor=LeanMonitor,  # no per-event statistics for web views that are not served
        Stream=IdleFreeStream,  # take_events without wakes while nothing is buffered (streams.kafka.faust_take)
    )
    register_agents(app, pipeline, serve)
    return app, pipeline


def serve_metrics(app: faust.App, pipeline: Pipeline, settings: Settings) -> None:
    """The worker's /metrics: what the stages record, plus live breaker states, the rate
    limiter's store outages and (with `metrics_lag`) the consumer group's lag; and /healthz, which
    fails while the event loop is stuck."""
    metrics.REGISTRY.register(metrics.BreakerCollector(pipeline.inference.breaker_states))
    if pipeline.gatekeeper is not None:
        limiter = pipeline.gatekeeper.limiter
        metrics.REGISTRY.register(metrics.ValueCounter(
            "inferstream_rate_limit_store_unavailable", "Rate-limit checks Redis could not answer",
            lambda: limiter.unavailable_count,
        ))
    if settings.metrics_lag:
        from streams.telemetry.lag import export_lag

        export_lag(app, settings)
    liveness = metrics.LoopLiveness()

    # /healthz (the pods' startup and liveness probes) passes only while the loop runs this timer.
    @app.timer(interval=metrics.LOOP_BEAT_S)
    async def mark_loop_alive() -> None:
        liveness.beat()

    metrics.serve(settings.metrics_host, settings.metrics_port, liveness)


class PipelineConnections(mode.Service):
    """Closes the pipeline's connections (registry consumer, PostgreSQL, Redis, backends) on stop.
    A worker stops its app, and so its agents, before the services it was given."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    async def on_stop(self) -> None:
        await self.pipeline.stop()


class Presence(mode.Service):
    """The worker's heartbeat (`streams.telemetry.presence`): published once the worker serves, kept
    through rebalances, withdrawn as soon as it stops."""

    def __init__(self, app: faust.App, pipeline: Pipeline, settings: Settings) -> None:
        super().__init__()
        self.app, self.pipeline = app, pipeline
        self.heartbeat = Heartbeat(settings, self.serving, STATS)
        self._models: list[str] | None = None
        self._task: asyncio.Task[None] | None = None

    def serving(self) -> list[str] | None:
        """The versions served now; None while the worker cannot serve."""
        if not self.pipeline.started or self.app.should_stop:
            self._models = None
        elif not self.app.rebalancing:  # during a rebalance, what it served before
            assigned = {tp.topic for tp in self.app.consumer.assignment()}
            self._models = self.pipeline.inference.served_versions(assigned) if assigned else None
        return self._models

    async def on_started(self) -> None:
        self._task = asyncio.create_task(self.heartbeat.run(), name="heartbeat")

    async def on_stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.heartbeat.close()


def run_worker(settings: Settings, register_agents: RegisterAgents) -> None:
    """Run a worker in the foreground until SIGINT/SIGTERM."""
    refuse_placeholder_secrets(settings)
    setup_logging(settings, "worker")
    setup_tracing(settings, "inferstream-worker")
    loop = asyncio.new_event_loop()  # Faust runs on the current loop
    asyncio.set_event_loop(loop)
    serve = loop.run_until_complete(bootstrap_registry(settings))
    app, pipeline = create_app(settings, serve, register_agents)
    if settings.metrics_port > 0:
        serve_metrics(app, pipeline, settings)
    # Our logging stays (Faust would replace it with colored text), and no banner or terminal
    # spinner is mixed into it (the spinner would also set the root logger to DEBUG).
    worker = QuickExitWorker(app, PipelineConnections(pipeline), Presence(app, pipeline, settings),
                             loglevel=settings.log_level, override_logging=False, quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()
