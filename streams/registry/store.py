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
from urllib.parse import urlsplit

import asyncpg
import onnxruntime as ort
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from minio.error import S3Error
from pydantic import TypeAdapter

from streams.registry.records import ModelInfo, ModelRegistry, TensorSignature, load_repository
from streams.settings import Settings
from streams.storage.cache import ReadThroughCache
from streams.storage.objects import MISSING, ObjectStore, parse_uri
from topics.names import Topics
from topics.seal import Sealer, SealError

log = logging.getLogger(__name__)


class RegistryError(ValueError):
    """A registration refused, with the reason."""


def check_artifact(info: ModelInfo) -> None:
    """The artifact must load and match the declared signature (onnxruntime backends)."""
    if not any(b.kind == "onnxruntime" for b in info.backends):
        return
    session = _load(info.path, info.key)
    _compare("input", info.inputs, session.get_inputs())
    _compare("output", info.outputs, session.get_outputs())


def _load(path: Path, key: str) -> ort.InferenceSession:
    """The artifact as an onnxruntime session. Any failure, a missing file included, is one
    refusal: the message must not tell a caller what exists on this machine."""
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure is a refusal
        log.info("%s: %s does not load: %r", key, path, exc)
        raise RegistryError(UNLOADABLE.format(key=key)) from None


# One message whatever the cause: a missing file or object, or one that is no model.
UNLOADABLE = "{key}: the artifact does not load as an ONNX model"
_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _compare(kind: str, declared, actual) -> None:
    graph = {a.name: a for a in actual}
    if set(graph) != {d.name for d in declared}:
        raise RegistryError(f"{kind}s {sorted(graph)} of the artifact differ from the signature "
                            f"{sorted(d.name for d in declared)}")
    for spec in declared:
        node = graph[spec.name]
        dtype = _ORT_TYPES.get(node.type, node.type)
        shape = [d if isinstance(d, int) else -1 for d in node.shape]
        if dtype != spec.dtype or len(shape) != len(spec.shape) or any(
            a != -1 and s != -1 and a != s for a, s in zip(shape, spec.shape)
        ):
            raise RegistryError(f"{kind} {spec.name!r}: the artifact has {dtype}{shape}, "
                                f"the signature says {spec.dtype}{spec.shape}")


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


def triton_host_allowed(url: str | None, hosts: list[str]) -> bool:
    """Whether `url` is `host:port` with the host among `hosts`: the bridge and the workers
    connect where a registration points, so only to Triton servers the settings name."""
    if not url:
        return False
    try:
        parts = urlsplit(f"//{url}")
        port = parts.port
    except ValueError:
        return False
    return (port is not None and parts.hostname is not None and parts.hostname in hosts
            and f"//{url}" == f"//{parts.netloc}" and not parts.username and not parts.password)


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
            await asyncio.to_thread(check_artifact, local)
            await self._check_triton_backends(info)
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

    async def _check_triton_backends(self, info: ModelInfo) -> None:
        from streams.serving.backends.triton import check_triton_backend

        for spec in info.backends:
            if spec.kind != "triton":
                continue
            if not triton_host_allowed(spec.url, self.settings.triton_hosts):
                raise RegistryError(f"{info.key}: Triton backend {spec.url!r} is not host:port on a host of"
                                    " INFERSTREAM_TRITON_HOSTS")
            try:
                await check_triton_backend(info, spec, self.settings.triton_timeout_s)
            except ValueError as exc:  # our comparison of the served model with the signature
                raise RegistryError(f"{info.key}: Triton backend {spec.label}: {exc}") from None
            except Exception:  # noqa: BLE001 - never echo what a remote answered: refused, alike
                raise RegistryError(f"{info.key}: Triton backend {spec.label} did not answer as a Triton"
                                    " server serving this model") from None

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


class RegistryFollower:
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
    session = _load(local.path, local.key)

    def signature(nodes) -> list[TensorSignature]:
        return [TensorSignature(name=n.name, dtype=_ORT_TYPES.get(n.type, n.type),
                                shape=[d if isinstance(d, int) else -1 for d in n.shape]) for n in nodes]

    return local.model_copy(update={"inputs": signature(session.get_inputs()),
                                    "outputs": signature(session.get_outputs())})
