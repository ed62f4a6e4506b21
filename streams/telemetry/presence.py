"""Worker heartbeats in Redis: which workers of a consumer group are live, and which model
versions each serves. The bridge's readiness answers from them.

A worker writes `{prefix}:worker:{group}:{worker}` (JSON: its id, group, host, pid and served
versions) with a TTL of three heartbeat intervals, and adds its id to the group's index, the set
`{prefix}:workers:{group}`. It writes only while it can serve: its pipeline has started (the
registry replayed, its versions loaded) and its consumer holds partitions; a version counts as
served while a partition of the requests topic or of its model topic is here and a backend of it
is not cut off by an open breaker. A worker that stops cleanly deletes its key first thing; one that dies drops out when
the key expires. Readers fetch the keys the index names and prune the ids whose key is gone.

Each beat also writes the worker's model statistics (`streams.telemetry.model_stats`). Redis being down
fails nothing: the beat is skipped (counted, logged once per outage) and tried again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import RedisError

from streams.settings import Settings
from streams.storage.redis import redis_client
from streams.telemetry.model_stats import ModelStats

log = logging.getLogger(__name__)

TTL_INTERVALS = 3
# KEYS[1]: the index; KEYS[i + 1]: the heartbeat key of worker ARGV[i]. Drops the ids whose key is gone.
PRUNE_LUA = """
for i, worker in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('SREM', KEYS[1], worker) end
end
return 1
"""
MAX_WORKERS_READ = 1000  # a bound on one read of the index


class WorkerBeat(BaseModel):
    worker: str
    group: str
    host: str
    pid: int
    models: list[str]  # "name/version" of every version it serves


def worker_key(prefix: str, group: str, worker: str) -> str:
    return f"{prefix}:worker:{group}:{worker}"


def index_key(prefix: str, group: str) -> str:
    return f"{prefix}:workers:{group}"


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def publish(redis: aioredis.Redis, prefix: str, beat: WorkerBeat, ttl_s: float) -> None:
    ttl_ms = max(int(ttl_s * 1000), 1)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(worker_key(prefix, beat.group, beat.worker), orjson.dumps(beat.model_dump()), px=ttl_ms)
        pipe.sadd(index_key(prefix, beat.group), beat.worker)
        await pipe.execute()


async def withdraw(redis: aioredis.Redis, prefix: str, group: str, worker: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(worker_key(prefix, group, worker))
        pipe.srem(index_key(prefix, group), worker)
        await pipe.execute()


async def live_workers(redis: aioredis.Redis, prefix: str, group: str) -> list[WorkerBeat]:
    """The group's workers whose heartbeat has not expired; raises RedisError."""
    index = index_key(prefix, group)
    members: list[bytes | str] = await redis.srandmember(index, MAX_WORKERS_READ) or []  # type: ignore[assignment]
    ids = sorted(_text(i) for i in members)
    if not ids:
        return []
    keys = [worker_key(prefix, group, i) for i in ids]
    values = await redis.mget(keys)
    gone = [(key, i) for key, i, value in zip(keys, ids, values) if value is None]
    if gone:  # checked again in the script: a worker may have beaten since
        await redis.register_script(PRUNE_LUA)(keys=[index, *(key for key, _ in gone)], args=[i for _, i in gone])
    beats = []
    for value in values:
        if value is not None:
            try:
                beats.append(WorkerBeat.model_validate_json(value))
            except ValueError:
                log.warning("unreadable heartbeat in %s", index)
    return beats


def served(beats: list[WorkerBeat]) -> set[str]:
    """The "name/version"s some live worker serves."""
    return {key for beat in beats for key in beat.models}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Heartbeat:
    """A worker's heartbeat loop. `serving()` answers the versions the worker serves, or None
    while it cannot serve (starting, rebalancing, stopping)."""

    def __init__(self, settings: Settings, serving: Callable[[], list[str] | None], stats: ModelStats,
                 worker: str | None = None, redis: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.serving = serving
        self.stats = stats
        self.worker = worker or new_worker_id()
        self.redis = redis or redis_client(settings.redis_url)
        self.interval_s = settings.heartbeat_interval_s
        self.unavailable_count = 0  # beats Redis could not take
        self.published = False
        self.models: list[str] = []  # as last published
        self._store_up = True

    @property
    def prefix(self) -> str:
        return self.settings.topic_prefix

    async def beat(self) -> None:
        """Publish (or withdraw, when the worker cannot serve) and write the statistics."""
        models = self.serving()
        try:
            if models is not None:
                beat = WorkerBeat(worker=self.worker, group=self.settings.app_id, host=socket.gethostname(),
                                  pid=os.getpid(), models=sorted(models))
                await publish(self.redis, self.prefix, beat, self.interval_s * TTL_INTERVALS)
                if beat.models != self.models or not self.published:
                    log.info("worker %s live in group %s, serving %s", self.worker, self.settings.app_id, beat.models)
                self.published, self.models = True, beat.models
            elif self.published:
                await self.withdraw()
        except (RedisError, OSError) as exc:
            self.unavailable_count += 1
            if self._store_up:
                self._store_up = False
                log.warning("heartbeat not written: Redis unavailable (%r); retrying", exc)
        else:
            if not self._store_up:
                self._store_up = True
                log.info("heartbeat written again")
        await self.stats.flush(self.redis, self.prefix)

    async def run(self) -> None:
        """Beat every interval, and within a tick of what `serving()` answers changing: the
        first heartbeat follows the worker becoming able to serve, the withdrawal its stopping."""
        tick = min(0.2, self.interval_s)
        while True:
            try:
                await self.beat()
            except Exception:  # noqa: BLE001 - a heartbeat must never take the worker down
                log.exception("heartbeat failed")
            for _ in range(max(round(self.interval_s / tick), 1)):
                await asyncio.sleep(tick)
                if self._changed():
                    break

    def _changed(self) -> bool:
        models = self.serving()
        return (models is not None) != self.published or (models is not None and sorted(models) != self.models)

    async def withdraw(self) -> None:
        await withdraw(self.redis, self.prefix, self.settings.app_id, self.worker)
        self.published = False
        log.info("worker %s withdrew its heartbeat", self.worker)

    async def close(self) -> None:
        """Withdraw and write the last statistics, as far as Redis lets within a few seconds."""
        try:
            await asyncio.wait_for(self._last_words(), timeout=5)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("heartbeat not withdrawn (%r); it expires in %.0f s", exc, self.interval_s * TTL_INTERVALS)
        finally:
            await self.redis.aclose()

    async def _last_words(self) -> None:
        await self.withdraw()
        await self.stats.flush(self.redis, self.prefix)
