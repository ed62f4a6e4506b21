"""The work of each agent, free of Faust: the agents hand over consumed messages and an outbox;
the stages (`intake`, `inference`, `sink`, `batch_jobs`) decode, validate, route, infer and emit.

Delivery is at-least-once: an agent acknowledges its messages only after the outbox has been
flushed (every send confirmed by the broker), so a crash redelivers instead of losing. Effects
are idempotent: results are upserted by request id, S3 keys derive from the request id.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient

from streams.gate.gatekeeper import Gatekeeper
from streams.lifecycle import Service
from streams.registry.records import ModelRegistry
from streams.registry.store import RegistryFollower
from streams.settings import Settings
from streams.storage.objects import ObjectStore
from streams.storage.results import ResultsStore
from streams.worker.answers import Answers
from streams.worker.batch_jobs import BatchJobs
from streams.worker.inference import Inference
from streams.worker.intake import Intake
from streams.worker.reply_topics import ReplyTopics
from streams.worker.sink import Sink
from topics.names import Topics
from topics.seal import Sealer

log = logging.getLogger(__name__)


class Pipeline(Service):
    """A worker's stages (intake, inference, sink, batch jobs: each a `step` its agent runs on a
    chunk) and the services they share, started and stopped together."""

    def __init__(self, settings: Settings, registry: ModelRegistry, serve: list[str],
                 gatekeeper: Gatekeeper | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.registry = registry
        self.gatekeeper = gatekeeper
        self.store = ObjectStore(settings)
        self.results = ResultsStore(settings.postgres_dsn)
        self._admin: AIOKafkaAdminClient | None = None
        reply_topics = ReplyTopics(settings, self._list_topics)
        self.answers = Answers(settings, self.topics, self.store, Sealer(settings.cluster_secret), reply_topics)
        self.inference = Inference(settings, self.topics, registry, serve, self.store, self.answers)
        self.intake = Intake(settings, self.topics, registry, gatekeeper, self.store, self.results, reply_topics,
                             self.answers, self.inference)
        self.sink = Sink(self.results, self.answers)
        self.batch_jobs = BatchJobs(settings, registry, self.store, self.results, self.answers)
        self.follower = RegistryFollower(settings, registry, self.inference.on_registry_change)
        self._started = False
        self._start_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Idempotent: every agent awaits it before its first message."""
        async with self._start_lock:
            if self._started:
                return
            self.inference.stopping = False
            try:
                await asyncio.to_thread(self.store.ensure_bucket)
                await self.results.start()
                if self.gatekeeper is not None:
                    await self.gatekeeper.start(self.results.pool)
                self._admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap,
                                                  request_timeout_ms=15000)
                await self._admin.start()
                await self.follower.start()  # replays the registry: loads every served version
            except BaseException:
                await self._release()  # a retried start must not pile up connections
                raise
            self._started = True

    @property
    def stopping(self) -> bool:
        return self.inference.stopping

    @property
    def started(self) -> bool:
        """Started and not stopping: the registry replayed, its versions loaded."""
        return self._started and not self.stopping

    async def stop(self) -> None:
        self.inference.stopping = True  # from now on a missing server means "stopping", not "unavailable"
        await self._release()
        self._started = False

    async def _release(self) -> None:
        await self.follower.stop()
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
        await self.inference.stop()
        if self.gatekeeper is not None:
            await self.gatekeeper.stop()
        await self.results.stop()

    async def _list_topics(self) -> set[str]:
        if self._admin is None:
            raise RuntimeError("Pipeline.start() was not awaited")
        return set(await self._admin.list_topics())
