"""API keys, rate limits and tenant overrides against the real PostgreSQL and Redis, and the
read-through cache they share."""

import asyncio
import logging
import random
import time
import uuid

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from infra.local.stack import free_port
from streams.gate.auth import (
    INVALID_API_KEY,
    ApiKeyStore,
    Authenticator,
    hash_secret,
    new_api_key,
    parse_api_key,
)
from streams.gate.ratelimit import (
    RateLimiter,
    SlidingLog,
    TenantLimits,
    decide,
)
from streams.settings import Settings
from streams.storage.cache import ReadThroughCache
from streams.storage.schema import migrate
from topics.errors import ErrorCode, EventError
from topics.events import Credentials

pytestmark = pytest.mark.integration

PEPPER = "test-pepper"


@pytest.fixture(scope="module")
async def pool():
    """A throwaway database with the product's tables, dropped at the end."""
    base = Settings().postgres_dsn.rpartition("/")[0]
    name = f"inferstream_gk_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(f"{base}/postgres", timeout=10)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await migrate(f"{base}/{name}")
    pool = await asyncpg.create_pool(f"{base}/{name}", min_size=1, max_size=4, timeout=10)
    try:
        yield pool
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def redis():
    client = aioredis.Redis.from_url(Settings().redis_url, socket_timeout=5, socket_connect_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis):
    """A key prefix of the test's own; its keys are deleted at the end."""
    prefix = f"gktest-{uuid.uuid4().hex[:10]}"
    yield prefix
    keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
async def dead_redis():
    """A client of a port nobody listens on, that gives up at once."""
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_timeout=0.5,
                            socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    yield client
    await client.aclose()


def keys_of(pool, redis, prefix) -> ApiKeyStore:
    return ApiKeyStore(pool, redis, PEPPER, cache_ttl_s=30, key_prefix=prefix)


async def reason(coro) -> str:
    with pytest.raises(EventError) as caught:
        await asyncio.wait_for(coro, 10)
    assert caught.value.code == ErrorCode.UNAUTHENTICATED
    return caught.value.message


# -- API keys ------------------------------------------------------------------------------


async def test_create_then_verify(pool, redis, prefix):
    store = keys_of(pool, redis, prefix)
    full = await store.create("acme", ["infer:tiny"], "ci")
    key_id, secret = parse_api_key(full)

    for _ in range(2):  # from PostgreSQL, then from the cache
        principal = await store.verify(full)
        assert (principal.tenant, principal.subject, principal.scopes, principal.method) == (
            "acme", key_id, frozenset({"infer:tiny"}), "api_key")
    assert await redis.exists(f"{prefix}:apikey:{key_id}")

    auth = Authenticator(None, store, required=True)
    assert (await auth.authenticate(Credentials(api_key=full))).tenant == "acme"


async def test_only_the_hash_is_stored(pool, redis, prefix):
    store = keys_of(pool, redis, prefix)
    full = await store.create("hashco", ["infer"], "ci")
    key_id, secret = parse_api_key(full)
    row = await pool.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
    assert row["secret_hash"] == hash_secret(secret, PEPPER)
    assert all(secret not in str(value) for value in row.values())
    await store.verify(full)
    assert secret.encode() not in await redis.get(f"{prefix}:apikey:{key_id}")

    listed = await store.list("hashco")
    assert [k["key_id"] for k in listed] == [key_id]
    assert set(listed[0]) == {"key_id", "tenant", "scopes", "name", "created_at", "revoked_at"}


async def test_revoke_wins_over_the_cache_at_once(pool, redis, prefix):
    worker, admin = keys_of(pool, redis, prefix), keys_of(pool, redis, prefix)
    full = await worker.create("acme", ["infer"], "to-revoke")
    key_id, secret = parse_api_key(full)
    await worker.verify(full)  # now cached

    assert await admin.revoke(key_id)
    assert await reason(worker.verify(full)) == INVALID_API_KEY
    assert not await admin.revoke(key_id)  # already revoked
    assert next(k for k in await admin.list("acme") if k["key_id"] == key_id)["revoked_at"] is not None

    # A lookup that read the row before the revoke cannot put the key back in the cache.
    await redis.delete(f"{prefix}:apikey:{key_id}")
    stale = {"state": "active", "tenant": "acme", "scopes": ["infer"], "hash": hash_secret(secret, PEPPER)}
    await admin.revoke(key_id)
    await redis.set(f"{prefix}:apikey:{key_id}", orjson.dumps(stale), nx=True)
    assert await reason(worker.verify(full)) == INVALID_API_KEY


async def test_unknown_wrong_and_malformed_keys(pool, redis, prefix):
    store = keys_of(pool, redis, prefix)
    assert await reason(store.verify(new_api_key()[2])) == INVALID_API_KEY
    full = await store.create("acme", ["infer"], "ci")
    key_id, secret = parse_api_key(full)
    other_secret = new_api_key()[1]
    assert await reason(store.verify(f"isk_{key_id}_{other_secret}")) == INVALID_API_KEY
    assert await reason(store.verify("isk_nope")) == INVALID_API_KEY


async def test_keys_verify_from_postgres_when_redis_is_down(pool, redis, prefix, dead_redis):
    full = await keys_of(pool, redis, prefix).create("acme", ["infer"], "ci")
    principal = await asyncio.wait_for(keys_of(pool, dead_redis, prefix).verify(full), 10)
    assert principal.tenant == "acme"


# -- rate limits ---------------------------------------------------------------------------


async def test_two_workers_share_one_limit(redis, prefix):
    workers = [RateLimiter(redis, key_prefix=prefix), RateLimiter(redis, key_prefix=prefix)]
    decisions = [await workers[i % 2].check("acme", f"r{i}") for i in range(100)]
    assert all(d.allowed for d in decisions) and decisions[-1].remaining == 0
    for worker in workers:
        refused = await worker.check("acme", f"new-{id(worker)}")
        assert not refused.allowed and 0 < refused.retry_after_s <= 60
    # Redelivered requests were counted once and pass again.
    assert all([(await workers[1].check("acme", f"r{i}")).allowed for i in (0, 57, 99)])
    assert not (await workers[0].check("acme", "r100")).allowed
    assert (await workers[0].check("someone-else", "r100")).allowed


async def test_concurrent_checks_admit_exactly_the_limit(prefix):
    # Two workers, each with its own client (pool of at most 100 connections).
    clients = [aioredis.Redis.from_url(Settings().redis_url, socket_timeout=5) for _ in range(2)]
    try:
        workers = [RateLimiter(client, key_prefix=prefix) for client in clients]
        checks = [workers[i % 2].check("burst", f"r{i}", limit=100) for i in range(150)]
        decisions = await asyncio.wait_for(asyncio.gather(*checks), 30)
    finally:
        for client in clients:
            await client.aclose()
    assert sum(d.allowed for d in decisions) == 100


async def test_the_script_matches_the_reference(redis, prefix):
    """The Lua script and SlidingLog agree step by step on a random trace with a 1 s window."""
    limiter = RateLimiter(redis, window_s=1.0, key_prefix=prefix)
    reference = SlidingLog(1000)
    rng = random.Random(3)
    now = 1_000_000
    for step in range(400):
        now += rng.choice([0, 1, 7, 50, 300, 999, 1000])
        member = f"r{rng.randrange(step + 1)}" if rng.random() < 0.3 else f"n{step}"
        expected = decide(*reference.hit(member, 5, now), limit=5, now_ms=now, window_ms=1000)
        assert await limiter.check("trace", member, limit=5, now_ms=now) == expected, step


async def test_a_chunk_of_checks_in_one_call_matches_the_reference(redis, prefix):
    """Chunks of checks over three subjects, with members repeated inside a chunk, in one call
    each: the same decisions as SlidingLog made one by one."""
    limiter = RateLimiter(redis, window_s=1.0, key_prefix=prefix)
    references = {subject: SlidingLog(1000) for subject in ("a", "b", "c")}
    rng = random.Random(5)
    now = 2_000_000
    for step in range(60):
        now += rng.choice([0, 3, 200, 999, 1000])
        chunk = []
        for i in range(rng.randrange(1, 12)):
            subject = rng.choice("abc")
            member = f"r{rng.randrange(20)}" if rng.random() < 0.4 else f"n{step}.{i}"
            chunk.append((subject, member, rng.choice([2, 5])))
        expected = [decide(*references[s].hit(m, limit, now), limit=limit, now_ms=now, window_ms=1000)
                    for s, m, limit in chunk]
        assert await limiter.check_many(chunk, now_ms=now) == expected, step


async def test_log_keys_expire(redis, prefix):
    await RateLimiter(redis, window_s=60.0, key_prefix=prefix).check("ttl", "r1")
    assert 0 < await redis.pttl(f"{prefix}:ratelimit:ttl") <= 60_000


async def test_tenant_override(pool, redis, prefix):
    admin = TenantLimits(pool, redis, cache_ttl_s=30, key_prefix=prefix)
    worker = TenantLimits(pool, redis, cache_ttl_s=30, key_prefix=prefix)
    limiter = RateLimiter(redis, key_prefix=prefix)
    tenant = f"small-{prefix}"
    assert await worker.get(tenant) is None  # cached as "no override"

    await admin.set(tenant, 5)
    limit = await worker.get(tenant)
    assert limit == 5 and (await admin.list())[tenant] == 5
    decisions = [await limiter.check(tenant, f"r{i}", limit=limit) for i in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]

    assert await admin.clear(tenant)
    assert await worker.get(tenant) is None
    assert tenant not in await admin.list()
    assert not await admin.clear(tenant)
    with pytest.raises(ValueError):
        await admin.set(tenant, -1)


async def test_fail_closed_when_redis_is_down(dead_redis, caplog):
    caplog.set_level(logging.WARNING, logger="streams.gate.ratelimit")
    limiter = RateLimiter(dead_redis, fail_open=False)
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(EventError) as caught:
            await asyncio.wait_for(limiter.check("acme", "r1"), 5)
        assert caught.value.code == ErrorCode.UNAVAILABLE
        assert time.monotonic() - started < 2
    assert limiter.unavailable_count == 3
    assert sum("failing closed" in r.getMessage() for r in caplog.records) == 1  # once per transition


async def test_fail_open_when_redis_is_down(dead_redis, caplog):
    caplog.set_level(logging.WARNING, logger="streams.gate.ratelimit")
    limiter = RateLimiter(dead_redis, fail_open=True)
    decisions = [await asyncio.wait_for(limiter.check("acme", f"r{i}"), 5) for i in range(3)]
    assert all(d.allowed for d in decisions)
    assert limiter.unavailable_count == 3
    assert sum("failing open" in r.getMessage() for r in caplog.records) == 1


# -- the read-through cache they share -----------------------------------------------------


class Loader:
    """Loads `value` (as PostgreSQL would), counting the loads; `during` runs inside each load."""

    def __init__(self, value: str, during=None) -> None:
        self.value, self.during, self.loads = value, during, 0

    async def __call__(self) -> str:
        self.loads += 1
        if self.during is not None:
            await self.during()
        return self.value


def text_cache(redis, prefix: str, ttl_of=None) -> ReadThroughCache[str]:
    return ReadThroughCache(redis, f"{prefix}:text", 30, str.encode,
                            lambda cached: cached.decode() if isinstance(cached, bytes) else cached, ttl_of)


async def test_the_cache_loads_once_then_answers_from_redis(redis, prefix):
    cache = text_cache(redis, prefix, ttl_of=lambda value: 1 if value == "none" else 30)
    load = Loader("row")
    assert [await cache.get("a", load) for _ in range(3)] == ["row"] * 3
    assert load.loads == 1
    assert 29_000 < await redis.pttl(f"{prefix}:text:a") <= 30_000
    assert await cache.get("b", Loader("none")) == "none"
    assert 0 < await redis.pttl(f"{prefix}:text:b") <= 1_000  # a value's own TTL


async def test_a_change_during_a_lookup_is_not_undone_by_it(redis, prefix):
    cache = text_cache(redis, prefix)
    # The lookup reads the row, then the change lands before the lookup fills the cache.
    stale = Loader("old", during=lambda: cache.put("a", "new"))
    assert await cache.get("a", stale) == "old"
    assert await cache.get("a", Loader("unused")) == "new"

    await cache.invalidate("a")
    fresh = Loader("newer")
    assert await cache.get("a", fresh) == "newer" and fresh.loads == 1


async def test_the_cache_loads_every_time_when_redis_is_down_and_changes_raise(dead_redis, prefix):
    cache = text_cache(dead_redis, prefix)
    load = Loader("row")
    assert [await asyncio.wait_for(cache.get("a", load), 5) for _ in range(2)] == ["row"] * 2
    assert load.loads == 2
    with pytest.raises(RedisError):
        await asyncio.wait_for(cache.put("a", "new"), 5)
    with pytest.raises(RedisError):
        await asyncio.wait_for(cache.invalidate("a"), 5)
