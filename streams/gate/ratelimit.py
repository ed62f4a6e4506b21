"""Request rate limits per subject (an API key or a tenant), shared by every worker through Redis.

Each subject has a sliding log: a sorted set whose members name admitted events (the intake
uses their topic, partition and offset) scored by arrival time in ms. One Lua script drops the
entries that left the window, lets a member already in the log through again (a redelivered
event is counted once; a request id reused in a new event is a new member), refuses a new member
when the log holds `limit` entries, and otherwise adds it. A chunk's checks go in one call of the
script, made in order. Being one script it is atomic across workers, and being a log rather than
a counter it is exact at the window's boundary.

`SlidingLog` is the same semantics in pure Python, for unit tests and as the reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streams.storage.cache import ReadThroughCache
from topics.errors import ErrorCode, EventError

log = logging.getLogger(__name__)

# KEYS: the subjects' logs. ARGV: now_ms ("" = the Redis server's clock, one clock for every
# worker), window_ms, then per check: its log's index in KEYS, limit, member. Checks run in
# order, so a chunk's checks are counted as if made one by one. Returns, per check, {allowed 0|1,
# entries in the window, oldest entry's ms or -1}, then now_ms. An entry scored t is in the window
# while now - t < window.
RATE_LIMIT_LUA = """
local window = tonumber(ARGV[2])
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
for _, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
end
local out = {}
for i = 3, #ARGV, 3 do
  local key, limit, member = KEYS[tonumber(ARGV[i])], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local count = redis.call('ZCARD', key)
  local allowed = 1
  if not redis.call('ZSCORE', key, member) then
    if count >= limit then
      allowed = 0
    else
      redis.call('ZADD', key, now, member)
      redis.call('PEXPIRE', key, window)
      count = count + 1
    end
  end
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  out[#out + 1] = allowed
  out[#out + 1] = count
  out[#out + 1] = first[2] and tonumber(first[2]) or -1
end
out[#out + 1] = now
return out
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: float  # 0 when allowed


def decide(allowed: bool, count: int, oldest_ms: int | None, limit: int, now_ms: int, window_ms: int) -> Decision:
    """A Decision from one step of the log: `count` entries in the window after it."""
    if allowed:
        retry_ms = 0
    elif oldest_ms is None:  # a limit of 0: nothing will ever leave to make room
        retry_ms = window_ms
    else:
        retry_ms = oldest_ms + window_ms - now_ms  # when the oldest entry leaves the window
    return Decision(allowed, limit, max(limit - count, 0), retry_ms / 1000)


class SlidingLog:
    """The Lua script's semantics for one subject, in memory."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._entries: dict[str, int] = {}  # request id -> arrival ms

    def hit(self, member: str, limit: int, now_ms: int) -> tuple[bool, int, int | None]:
        """(allowed, entries in the window after this hit, oldest entry's ms)."""
        self._entries = {m: t for m, t in self._entries.items() if now_ms - t < self.window_ms}
        if member not in self._entries:
            if len(self._entries) >= limit:
                return False, len(self._entries), self._oldest()
            self._entries[member] = now_ms
        return True, len(self._entries), self._oldest()

    def check(self, member: str, limit: int, now_ms: int) -> Decision:
        return decide(*self.hit(member, limit, now_ms), limit=limit, now_ms=now_ms, window_ms=self.window_ms)

    def _oldest(self) -> int | None:
        return min(self._entries.values(), default=None)


class RateLimiter:
    """Sliding-log limits in Redis. When Redis cannot answer, `fail_open` lets requests through
    unlimited (counted in `unavailable_count`); otherwise they fail with UNAVAILABLE."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        default_limit: int = 100,
        window_s: float = 60.0,
        fail_open: bool = False,
        key_prefix: str = "inferstream",
    ) -> None:
        self.default_limit = default_limit
        self.window_ms = int(window_s * 1000)
        self.fail_open = fail_open
        self.unavailable_count = 0  # checks Redis could not answer
        self._prefix = key_prefix
        self._script = redis.register_script(RATE_LIMIT_LUA)
        self._store_up = True

    async def check(
        self, subject: str, member: str, limit: int | None = None, now_ms: int | None = None
    ) -> Decision:
        """Count `member` against `subject`'s limit (the default unless given). `now_ms` is
        for tests; by default the Redis server's clock is used."""
        return (await self.check_many([(subject, member, limit)], now_ms))[0]

    async def check_many(
        self, checks: list[tuple[str, str, int | None]], now_ms: int | None = None
    ) -> list[Decision]:
        """`check` for each (subject, member, limit) in order, in one round trip: exact, as if
        made one by one."""
        keys: dict[str, int] = {}
        args: list[str | int] = ["" if now_ms is None else now_ms, self.window_ms]
        limits = []
        for subject, member, limit in checks:
            limit = self.default_limit if limit is None else limit
            limits.append(limit)
            args += [keys.setdefault(self._key(subject), len(keys) + 1), limit, member]
        try:
            out = await self._script(keys=list(keys), args=args)
        except RedisError as exc:
            return [self._store_down(limit, exc) for limit in limits]
        if not self._store_up:
            self._store_up = True
            log.warning("rate limiter store available again; limits are enforced")
        now = out[-1]
        return [decide(bool(out[3 * i]), out[3 * i + 1], None if out[3 * i + 2] < 0 else out[3 * i + 2], limit, now,
                       self.window_ms) for i, limit in enumerate(limits)]

    def _key(self, subject: str) -> str:
        return f"{self._prefix}:ratelimit:{subject}"

    def _store_down(self, limit: int, exc: RedisError) -> Decision:
        self.unavailable_count += 1
        if self._store_up:
            self._store_up = False
            policy = "open: requests pass unlimited" if self.fail_open else "closed: requests are refused"
            log.warning("rate limiter store unavailable (%s); failing %s", exc, policy)
        if self.fail_open:
            return Decision(True, limit, limit, 0.0)
        raise EventError(ErrorCode.UNAVAILABLE, f"rate limiter unavailable ({type(exc).__name__}); try again later")


class TenantLimits:
    """Per-tenant overrides of the default limit (requests per limiter window, a minute by
    default), in PostgreSQL behind a Redis cache (`streams.storage.cache`). Writes overwrite the
    cached value, so a change is never undone by a stale read."""

    def __init__(
        self, pool: asyncpg.Pool, redis: aioredis.Redis, cache_ttl_s: float = 30, key_prefix: str = "inferstream"
    ) -> None:
        self._pool = pool
        self._cache: ReadThroughCache[int | None] = ReadThroughCache(
            redis, f"{key_prefix}:tenantlimit", cache_ttl_s, _encode_limit, _decode_limit,
        )

    async def get(self, tenant: str) -> int | None:
        return await self._cache.get(tenant, lambda: self._load(tenant))

    async def set(self, tenant: str, requests_per_minute: int) -> None:
        if requests_per_minute < 0:
            raise ValueError("a limit cannot be negative")
        await self._pool.execute(
            "INSERT INTO tenant_limits (tenant, requests_per_minute) VALUES ($1, $2) ON CONFLICT (tenant)"
            " DO UPDATE SET requests_per_minute = EXCLUDED.requests_per_minute, updated_at = now()",
            tenant, requests_per_minute,
        )
        await self._cache.put(tenant, requests_per_minute)

    async def clear(self, tenant: str) -> bool:
        """True when the tenant had an override."""
        status = await self._pool.execute("DELETE FROM tenant_limits WHERE tenant = $1", tenant)
        await self._cache.put(tenant, None)
        return status == "DELETE 1"

    async def list(self) -> dict[str, int]:
        rows = await self._pool.fetch("SELECT tenant, requests_per_minute FROM tenant_limits ORDER BY tenant")
        return {row["tenant"]: row["requests_per_minute"] for row in rows}

    async def _load(self, tenant: str) -> int | None:
        return await self._pool.fetchval("SELECT requests_per_minute FROM tenant_limits WHERE tenant = $1", tenant)


def _encode_limit(limit: int | None) -> bytes:
    return b"" if limit is None else str(limit).encode()  # empty: cached "no override"


def _decode_limit(cached: bytes | str) -> int | None:
    return int(cached) if cached else None
