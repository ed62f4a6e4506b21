"""The registry's store and its propagation.

Writes go to PostgreSQL (the source of truth, table `model_versions`), then to a Redis cache of
the whole registry, then to the compacted registry topic (key `<name>/<version>`). Every worker
and bridge runs a `RegistryFollower`: it replays that topic from the beginning and then follows
it, so a change reaches running processes within about a second, without restarts.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from minio.error import S3Error
from pydantic import TypeAdapter

from streams.lifecycle import Service
from streams.registry.records import ModelInfo, ModelRegistry, load_repository
from streams.serving.backends import backend_class
from streams.settings import Settings
from streams.storage.cache import ReadThroughCache
from streams.storage.objects import MISSING, ObjectStore, parse_uri
from topics.names import Topics
from topics.seal import Sealer, SealError

log = logging.getLogger(__name__)


class RegistryError(ValueError):
    """A registration refused, with the reason."""


def fetch_artifact(info: ModelInfo, store: ObjectStore, cache_dir: Path) -> ModelInfo:
    """A version whose artifact is in S3, with `path` pointing at a local copy."""
    if not info.artifact or not info.artifact.startswith("s3://"):
        return info
    bucket, key = parse_uri(info.artifact)
    local = cache_dir / info.name / info.version / "model.onnx"
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        store.client.fget_object(bucket, key, str(local) + ".part")
        Path(str(local) + ".part").replace(local)
    return info.model_copy(update={"path": local})


_VERSIONS = TypeAdapter(list[ModelInfo])
_ALL_VERSIONS = "versions"  # the cache entry's name


class RegistryStore:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.topic = Topics(settings.topic_prefix).registry
        self.pool = pool
        # The whole registry as one entry: every read wants all of it.
        self.cache: ReadThroughCache[builtins.list[ModelInfo]] = ReadThroughCache(
            redis, f"{settings.topic_prefix}:registry", settings.registry_cache_ttl_s,
            _VERSIONS.dump_json, _VERSIONS.validate_json,
        )
        self.store = ObjectStore(settings)

    async def list(self) -> list[ModelInfo]:
        return await self.cache.get(_ALL_VERSIONS, self._load)

    async def _load(self) -> builtins.list[ModelInfo]:
        rows = await self.pool.fetch("SELECT doc FROM model_versions ORDER BY name, version")
        return [ModelInfo.model_validate_json(r["doc"]) for r in rows]

    async def get(self, name: str, version: str) -> ModelInfo | None:
        return next((i for i in await self.list() if i.name == name and i.version == version), None)

    async def save(self, info: ModelInfo, *, validate: bool = True) -> ModelInfo:
        """Validate, store with the next revision, refresh the cache, publish."""
        if validate:
            local = await asyncio.to_thread(fetch_artifact, info, self.store, self.settings.state_dir / "artifacts")
            await self._check_backends(local)
        async with self.pool.acquire() as conn, conn.transaction():
            current = await conn.fetchval(
                "SELECT revision FROM model_versions WHERE name = $1 AND version = $2 FOR UPDATE",
                info.name, info.version,
            )
            info = info.model_copy(update={"revision": (current or 0) + 1})
            await conn.execute(
                "INSERT INTO model_versions (name, version, revision, doc) VALUES ($1, $2, $3, $4::jsonb)"
                " ON CONFLICT (name, version) DO UPDATE SET revision = EXCLUDED.revision,"
                " doc = EXCLUDED.doc, updated_at = now()",
                info.name, info.version, info.revision, info.model_dump_json(),
            )
        await self.cache.invalidate(_ALL_VERSIONS)
        await self.publish([info])
        return info

    async def _check_backends(self, info: ModelInfo) -> None:
        """Each backend of the version must be able to run it (its check says why not)."""
        for spec in info.backends:
            try:
                await backend_class(spec.kind).check(info, spec, self.settings)
            except ValueError as exc:
                raise RegistryError(str(exc)) from None

    async def publish(self, infos: builtins.list[ModelInfo]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            sealer = Sealer(self.settings.cluster_secret)
            for info in infos:
                key, value = info.key.encode(), info.model_dump_json().encode()
                await producer.send(self.topic, value, key=key, headers=[sealer.seal(self.topic, key, value, {})])
            await producer.flush()
        finally:
            await producer.stop()

    async def register_repository(self, repository: Path) -> builtins.list[ModelInfo]:
        """Register built models that are not registered yet (existing records stay as they are)."""
        known = {i.key for i in await self.list()}
        added = [await self.save(i) for i in load_repository(repository) if i.key not in known]
        return added


async def save_record(settings: Settings, info: ModelInfo) -> ModelInfo:
    """`RegistryStore.save` with connections of its own (scripts, benchmarks, tests)."""
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=2)
    redis = aioredis.from_url(settings.redis_url)
    try:
        return await RegistryStore(settings, pool, redis).save(info)
    finally:
        await redis.aclose()
        await pool.close()


class RegistryFollower(Service):
    """Keeps a `ModelRegistry` current from the registry topic."""

    def __init__(self, settings: Settings, registry: ModelRegistry,
                 on_change: Callable[[ModelInfo], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.on_change = on_change
        self.topic = Topics(settings.topic_prefix).registry
        self.sealer = Sealer(settings.cluster_secret)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Replay the topic up to its current end, then follow it in the background."""
        if self._consumer is not None:
            return
        # Off the latency path: a long wait, ~1 fetch a second while nothing changes (on the local
        # broker a change is then seen within half the wait; Apache Kafka answers at once).
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                          enable_auto_commit=False,
                                          fetch_max_wait_ms=self.settings.kafka_idle_fetch_max_wait_ms)
        await self._consumer.start()
        partitions = [TopicPartition(self.topic, p)
                      for p in sorted(self._consumer.partitions_for_topic(self.topic) or {0})]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        ends = await self._consumer.end_offsets(partitions)
        while await self._behind(ends):
            await self._poll()
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("registry follower not started")
        return self._consumer

    async def _behind(self, ends: dict[TopicPartition, int]) -> bool:
        for tp, end in ends.items():
            if await self.consumer.position(tp) < end:
                return True
        return False

    async def _follow(self) -> None:
        while True:
            await self._poll()

    async def _poll(self) -> None:
        for records in (await self.consumer.getmany(timeout_ms=500)).values():
            for record in records:
                if record.value is None:
                    continue
                try:
                    self.sealer.open(self.topic, record.key, record.value, list(record.headers or ()))
                except SealError as exc:
                    log.warning("ignored a registry record at offset %d not written by the product: %s",
                                record.offset, exc)
                    continue
                try:
                    info = ModelInfo.model_validate_json(record.value)
                except ValueError as exc:
                    log.warning("ignored a bad registry record at offset %d: %s", record.offset, exc)
                    continue
                if self.registry.apply(info):
                    log.info("registry: %s rev %d (%s, weight %d)", info.key, info.revision, info.status, info.weight)
                    if self.on_change is not None:
                        await self.on_change(info)


def info_from_artifact(name: str, version: str, artifact: str, store: ObjectStore, cache_dir: Path,
                       **fields) -> ModelInfo:
    """A version record whose signature is read from its ONNX artifact (unless given)."""
    from streams.serving.backends.onnx import UNLOADABLE, read_signature  # onnxruntime, only when called

    fields = {"max_batch_size": 64, "inputs": [], "outputs": [], **fields}
    if artifact.startswith("s3://"):
        store.check_artifact_uri(artifact)
    draft = ModelInfo(name=name, version=version, artifact=artifact, path=Path(artifact), **fields)
    try:
        local = fetch_artifact(draft, store, cache_dir)
    except S3Error as exc:
        if exc.code not in MISSING:
            raise  # the S3 server's trouble, not the registration's
        raise RegistryError(UNLOADABLE.format(key=draft.key)) from None
    if draft.inputs and draft.outputs:
        return local
    try:
        inputs, outputs = read_signature(local.path, local.key)
    except ValueError as exc:
        raise RegistryError(str(exc)) from None
    return local.model_copy(update={"inputs": inputs, "outputs": outputs})
