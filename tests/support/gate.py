"""Workers behind the gate: JWT settings and tokens, the stores of API keys and registry records,
and calls with credentials. Shared by the auth, gatekeeping and trust-boundary tests."""

from __future__ import annotations

import time

import asyncpg
import jwt
import redis.asyncio as aioredis

from infra.local.harness import Worker, tiny_input
from streams.client import InferenceClient
from streams.gate.auth import ApiKeyStore
from streams.registry.store import RegistryStore
from streams.settings import Settings
from support.waiting import wait_for
from topics.events import Credentials, Result

SECRET = "test-hs256-secret-of-enough-length-0123456789"
AUTH = {"auth_required": True, "jwt_hs_secret": SECRET, "jwt_issuer": "inferstream-tests",
        "jwt_audience": "inferstream", "jwt_algorithms": ["HS256"]}


def token(**claims) -> str:
    """A JWT the AUTH settings accept (tenant acme, scope infer); a claim given None is left out."""
    now = int(time.time())
    body = {"iss": "inferstream-tests", "aud": "inferstream", "tenant": "acme", "scope": "infer",
            "sub": "alice", "iat": now, "exp": now + 300, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, algorithm="HS256")


class Stores:
    """The test's own PostgreSQL pool and Redis client, for keys and registry records."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __aenter__(self) -> Stores:
        self.pool = await asyncpg.create_pool(self.settings.postgres_dsn, min_size=1, max_size=2)
        self.redis = aioredis.from_url(self.settings.redis_url)
        self.keys = ApiKeyStore(self.pool, self.redis, self.settings.api_key_pepper,
                                key_prefix=self.settings.topic_prefix)
        self.registry = RegistryStore(self.settings, self.pool, self.redis)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.redis.aclose()
        await self.pool.close()


async def call(client: InferenceClient, credentials: Credentials | None, seed: int = 0, **fields) -> Result:
    """One tiny request with these credentials, and its answer."""
    request = client.request("tiny", timeout=30, credentials=credentials, **fields)
    return await client.wait(request, await client.send(request, tiny_input(seed=seed)))


async def ready_with(client: InferenceClient, worker: Worker, credentials: Credentials) -> None:
    """Until the worker answers a request with these credentials (its consumers have joined
    their groups)."""

    async def answered() -> bool:
        worker.check_running()
        request = client.request("tiny", timeout=3, credentials=credentials)
        try:
            await client.wait(request, await client.send(request, tiny_input()))
        except TimeoutError:
            return False
        return True

    try:
        await wait_for(answered, timeout=90, interval=0, what="an answer from the worker")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{worker.log()[-3000:]}") from None
