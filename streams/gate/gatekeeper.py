"""The intake's gatekeeping stage: who may call (JWT or API key), and how often (rate limits in
Redis per tenant). Refusals are error results with stable codes (UNAUTHENTICATED, FORBIDDEN,
RATE_LIMITED, UNAVAILABLE), which the bridge maps to 401, 403, 429 and 503."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from streams.gate.auth import ANONYMOUS, ApiKeyStore, Authenticator, JwtVerifier, Principal
from streams.gate.ratelimit import RateLimiter, TenantLimits
from streams.settings import Settings
from streams.storage.redis import redis_client
from topics.errors import ErrorCode, EventError
from topics.events import Credentials, InferenceRequest


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
        if self._authenticator is not None:
            return
        keys = ApiKeyStore(pool, self.redis, self.settings.api_key_pepper,
                           self.settings.api_key_cache_ttl_s, key_prefix=self.settings.topic_prefix)
        self._authenticator = Authenticator(jwt_verifier(self.settings), keys, self.settings.auth_required)
        self.tenant_limits = TenantLimits(pool, self.redis, self.settings.api_key_cache_ttl_s,
                                          key_prefix=self.settings.topic_prefix)

    async def stop(self) -> None:
        self._authenticator = self.tenant_limits = None
        await self.redis.aclose()

    async def authenticate_many(
        self, requests: list[tuple[InferenceRequest, Principal | None]],
    ) -> list[Principal | EventError]:
        """For each (request, vouched) the caller allowed to call the request's model, or the
        reason to refuse it (never raises): one authentication per distinct credentials.
        `vouched`: the principal a product seal names (a batch item's owner), instead of credentials."""
        if self._authenticator is None:
            raise RuntimeError("Gatekeeper.start() was not awaited")
        known: dict[tuple[str | None, str | None], Principal | EventError] = {}
        answers: list[Principal | EventError] = []
        for request, vouched in requests:
            try:
                if vouched is None:
                    credentials = request.credentials
                    key = (credentials.authorization, credentials.api_key) if credentials else (None, None)
                    if key not in known:
                        known[key] = await self._identify(credentials)
                    principal = known[key]
                    if isinstance(principal, EventError):
                        raise principal
                elif vouched is ANONYMOUS and self._authenticator.required:
                    raise EventError(ErrorCode.UNAUTHENTICATED, "submitted without credentials, which are now required")
                else:
                    principal = vouched
                principal.authorize(request.model)
                answers.append(principal)
            except EventError as error:
                answers.append(error)
        return answers

    async def _identify(self, credentials: Credentials | None) -> Principal | EventError:
        assert self._authenticator is not None
        try:
            return await self._authenticator.authenticate(credentials)
        except EventError as error:
            return error

    async def count_many(self, admissions: list[tuple[Principal | None, str]]) -> list[EventError | None]:
        """Count admissions against their tenants' limits, in one round trip to the limiter.
        Each is (principal, member): `member` names the admitted event (its topic, partition and
        offset), so a redelivery counts once and a reused request id again. For each, the reason
        to refuse it, or None."""
        if self.tenant_limits is None:
            raise RuntimeError("Gatekeeper.start() was not awaited")
        counted = [(i, p) for i, (p, _) in enumerate(admissions) if p is not None and p is not ANONYMOUS]
        answers: list[EventError | None] = [None] * len(admissions)  # anonymous callers exist only where auth is off
        if not counted:
            return answers
        try:
            limits = {tenant: await self.tenant_limits.get(tenant) for tenant in {p.tenant for _, p in counted}}
            decisions = await self.limiter.check_many(
                [(f"tenant:{p.tenant}", admissions[i][1], limits[p.tenant]) for i, p in counted])
        except EventError as error:
            for i, _ in counted:
                answers[i] = error
            return answers
        for (i, principal), decision in zip(counted, decisions):
            if not decision.allowed:
                answers[i] = EventError(
                    ErrorCode.RATE_LIMITED,
                    f"tenant {principal.tenant!r} is over {decision.limit} requests per minute; "
                    f"retry in {decision.retry_after_s:.1f} s",
                )
        return answers
