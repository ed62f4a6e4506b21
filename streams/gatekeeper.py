"""The intake's gatekeeping stage: who may call (JWT or API key), and how often (rate limits in
Redis per tenant). Refusals are error results with stable codes (UNAUTHENTICATED, FORBIDDEN,
RATE_LIMITED, UNAVAILABLE), which the bridge maps to 401, 403, 429 and 503."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streams.auth import ANONYMOUS, ApiKeyStore, Authenticator, JwtVerifier, Principal
from streams.ratelimit import RateLimiter, TenantLimits
from streams.settings import Settings
from topics.errors import ErrorCode, EventError
from topics.events import InferenceRequest


def jwt_verifier(settings: Settings) -> JwtVerifier | None:
    public_key = settings.jwt_public_key
    if public_key and not public_key.lstrip().startswith("-----") and Path(public_key).is_file():
        public_key = Path(public_key).read_text()
    hs = [a for a in settings.jwt_algorithms if a.startswith("HS")] if settings.jwt_hs_secret else []
    rs = [a for a in settings.jwt_algorithms if not a.startswith("HS")] if public_key else []
    if not hs and not rs:
        return None  # no keys configured: bearer tokens are refused
    return JwtVerifier(
        hs + rs, hs_secret=settings.jwt_hs_secret or None, rs_public_key=public_key or None,
        issuer=settings.jwt_issuer or None, audience=settings.jwt_audience or None,
        leeway_s=settings.jwt_leeway_s, require_exp=settings.jwt_require_exp,
    )


def redis_client(url: str) -> aioredis.Redis:
    """Fails fast when Redis is down (redis-py's default retries take seconds), and waits for a
    free connection rather than failing when a burst of checks outnumbers the pool."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=2.0, socket_timeout=1.0, socket_connect_timeout=1.0,
    )
    return aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 1))


class Gatekeeper:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis_client(settings.redis_url)
        self._authenticator: Authenticator | None = None
        self.limiter = RateLimiter(
            self.redis, default_limit=settings.rate_limit_per_minute, window_s=60.0,
            fail_open=settings.rate_limit_fail_open, key_prefix=settings.topic_prefix,
        )
        self.tenant_limits: TenantLimits | None = None

    async def start(self, pool: asyncpg.Pool) -> None:
        keys = ApiKeyStore(pool, self.redis, self.settings.api_key_pepper,
                           self.settings.api_key_cache_ttl_s, key_prefix=self.settings.topic_prefix)
        self._authenticator = Authenticator(jwt_verifier(self.settings), keys, self.settings.auth_required)
        self.tenant_limits = TenantLimits(pool, self.redis, self.settings.api_key_cache_ttl_s,
                                          key_prefix=self.settings.topic_prefix)

    async def stop(self) -> None:
        await self.redis.aclose()

    async def authenticate(self, request: InferenceRequest, vouched: Principal | None = None) -> Principal | EventError:
        """The caller allowed to call the request's model, or the reason to refuse it (never raises).
        `vouched`: the principal a product seal names (a batch item's owner), instead of credentials."""
        if self._authenticator is None:
            raise RuntimeError("Gatekeeper.start() was not awaited")
        try:
            if vouched is None:
                principal = await self._authenticator.authenticate(request.credentials)
            elif vouched is ANONYMOUS and self._authenticator.required:
                raise EventError(ErrorCode.UNAUTHENTICATED, "submitted without credentials, which are now required")
            else:
                principal = vouched
            principal.authorize(request.model)
            return principal
        except EventError as error:
            return error

    async def count(self, principal: Principal, member: str) -> EventError | None:
        """Count one admission against the tenant's limit. `member` names the admitted event
        (its topic, partition and offset): a redelivery counts once, a reused request id again.
        The reason to refuse it, or None."""
        if principal is ANONYMOUS:  # anonymous callers exist only where auth is off
            return None
        if self.tenant_limits is None:
            raise RuntimeError("Gatekeeper.start() was not awaited")
        try:
            limit = await self.tenant_limits.get(principal.tenant)
            decision = await self.limiter.check(f"tenant:{principal.tenant}", member, limit)
        except EventError as error:
            return error
        if decision.allowed:
            return None
        return EventError(
            ErrorCode.RATE_LIMITED,
            f"tenant {principal.tenant!r} is over {decision.limit} requests per minute; "
            f"retry in {decision.retry_after_s:.1f} s",
        )
