"""Who sent a request, and may they call this model: JWT bearer tokens and API keys both resolve
to a Principal (tenant, subject, scopes).

Scopes: "infer" allows every model, "infer:<model>" one model.
Tenants and scopes are checked against a narrow charset wherever they come from a caller (token
claims, key creation): they end up in PostgreSQL rows, Redis keys and logs.
API keys look like `isk_<key_id>_<secret>`; only an HMAC-SHA256 of the secret (keyed by a server
pepper) is stored. Keys are random and high-entropy, so a fast keyed hash is enough; a slow
password hash would only cost latency on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg
import jwt
import orjson
import redis.asyncio as aioredis

from streams.storage.cache import ReadThroughCache
from topics.errors import ErrorCode, EventError
from topics.events import Credentials

log = logging.getLogger(__name__)

INFER_SCOPE = "infer"
ADMIN_SCOPE = "admin"  # registry changes


@dataclass(frozen=True)
class Principal:
    tenant: str
    subject: str
    scopes: frozenset[str]
    method: str  # "jwt" | "api_key" | "anonymous"

    def allows(self, model: str) -> bool:
        return INFER_SCOPE in self.scopes or f"{INFER_SCOPE}:{model}" in self.scopes

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes

    def authorize(self, model: str) -> None:
        """Raise FORBIDDEN unless the principal may call `model`."""
        if not self.allows(model):
            raise EventError(ErrorCode.FORBIDDEN, f"{self.method} principal {self.subject!r} of tenant"
                             f" {self.tenant!r} has no {INFER_SCOPE!r} scope for model {model!r}")


ANONYMOUS = Principal(tenant="anonymous", subject="anonymous", scopes=frozenset({INFER_SCOPE}), method="anonymous")


def principal_claims(principal: Principal) -> dict[str, Any]:
    """The principal as a seal carries it: a batch's owner, vouched for on each of its items."""
    return {"tenant": principal.tenant, "subject": principal.subject, "scopes": sorted(principal.scopes),
            "method": principal.method}


def principal_from_claims(claims: Any) -> Principal | None:
    """The principal a seal vouches for, or None when the claims do not describe one."""
    if not isinstance(claims, dict) or claims.get("method") not in ("jwt", "api_key", "anonymous"):
        return None
    if claims["method"] == "anonymous":
        return ANONYMOUS
    tenant, subject, scopes = claims.get("tenant"), claims.get("subject"), claims.get("scopes")
    if not (isinstance(tenant, str) and is_valid_tenant(tenant) and isinstance(subject, str)
            and isinstance(scopes, list) and are_valid_scopes(scopes)):
        return None
    return Principal(tenant=tenant, subject=subject, scopes=frozenset(scopes), method=claims["method"])


def _unauthenticated(reason: str) -> EventError:
    return EventError(ErrorCode.UNAUTHENTICATED, reason)


# -- tenants and scopes --------------------------------------------------------------------

_TENANT = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
_SCOPE = re.compile(r"[A-Za-z0-9._:/*-]{1,128}")
MAX_SCOPES = 64
TENANT_RULE = "1-64 characters from A-Z a-z 0-9 . _ : @ -"
SCOPE_CHARS_RULE = "1-128 characters from A-Z a-z 0-9 . _ : / * -"
SCOPE_RULE = f"at most {MAX_SCOPES} scopes, each {SCOPE_CHARS_RULE}"


def is_valid_tenant(tenant: object) -> bool:
    return isinstance(tenant, str) and _TENANT.fullmatch(tenant) is not None


def are_valid_scopes(scopes: list[Any]) -> bool:
    return len(scopes) <= MAX_SCOPES and all(isinstance(s, str) and _SCOPE.fullmatch(s) for s in scopes)


def check_tenant_and_scopes(tenant: str, scopes: list[str]) -> None:
    """For callers that issue credentials: ValueError naming the rule that `tenant` or `scopes` breaks."""
    if not is_valid_tenant(tenant):
        raise ValueError(f"tenant {tenant!r} is not valid: use {TENANT_RULE}")
    if len(scopes) > MAX_SCOPES:
        raise ValueError(f"scopes: {len(scopes)} given, at most {MAX_SCOPES} allowed")
    for scope in scopes:
        if not isinstance(scope, str) or _SCOPE.fullmatch(scope) is None:
            raise ValueError(f"scope {scope!r} is not valid: use {SCOPE_CHARS_RULE}")


# -- JWT -----------------------------------------------------------------------------------


def _prepare_key(alg: str, hs_secret: str | None, rs_public_key: str | None) -> Any:
    """The verification key for one configured algorithm, checked once at startup. HS* use the
    shared secret and every other algorithm the public key, so a token can never make one be
    read as the other (PyJWT also refuses PEM material as an HMAC secret)."""
    if alg.lower() == "none":
        raise ValueError("the 'none' JWT algorithm cannot be configured")
    try:
        algorithm = jwt.get_algorithm_by_name(alg)
    except NotImplementedError:
        raise ValueError(f"unsupported JWT algorithm {alg!r}") from None
    symmetric = alg.startswith("HS")
    material = hs_secret if symmetric else rs_public_key
    if not material:
        raise ValueError(f"JWT algorithm {alg} needs {'hs_secret' if symmetric else 'rs_public_key'}")
    try:
        return algorithm.prepare_key(material)
    except (jwt.InvalidKeyError, ValueError) as exc:
        raise ValueError(f"the key configured for {alg} cannot be used: {exc}") from None


def _reason(exc: jwt.PyJWTError) -> str:
    """Why PyJWT rejected a token, in our words: its messages may quote token contents."""
    match exc:
        case jwt.ExpiredSignatureError():
            return "token expired"
        case jwt.ImmatureSignatureError():
            return "token not yet valid (nbf or iat in the future)"
        case jwt.MissingRequiredClaimError():
            return f"token lacks the {exc.claim!r} claim"
        case jwt.InvalidAudienceError():
            return "token audience does not match"
        case jwt.InvalidIssuerError():
            return "token issuer does not match"
        case jwt.InvalidSignatureError():  # before DecodeError: it is a subclass
            return "bad token signature"
        case jwt.DecodeError():
            return "malformed token"
        case _:
            return f"invalid token ({type(exc).__name__})"


def _scopes(claim: str, value: Any) -> frozenset[str]:
    """Never echoes the claim: its contents are the caller's."""
    if value is None:
        return frozenset()
    scopes = value.split() if isinstance(value, str) else value
    if not isinstance(scopes, list) or not are_valid_scopes(scopes):
        raise _unauthenticated(f"token {claim!r} claim must be a space-separated string or a list: {SCOPE_RULE}")
    return frozenset(scopes)


class JwtVerifier:
    def __init__(
        self,
        algorithms: list[str],
        *,
        hs_secret: str | None = None,
        rs_public_key: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = 0,
        require_exp: bool = True,
        tenant_claim: str = "tenant",
        scope_claim: str = "scope",
    ) -> None:
        if not algorithms:
            raise ValueError("configure at least one JWT algorithm")
        self._keys = {alg: _prepare_key(alg, hs_secret, rs_public_key) for alg in algorithms}
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        # A token without exp would be valid forever once issued (or leaked).
        self._required_claims = ["exp"] if require_exp else []
        self.tenant_claim = tenant_claim
        self.scope_claim = scope_claim

    def verify(self, token: str) -> Principal:
        alg = self._algorithm(token)
        try:
            # Exactly the header's algorithm, and only because it is configured: the key is the
            # one configured for it, never one chosen by the token.
            claims = jwt.decode(
                token, self._keys[alg], algorithms=[alg],
                issuer=self.issuer, audience=self.audience, leeway=self.leeway_s,
                options={"require": self._required_claims},
            )
        except jwt.PyJWTError as exc:
            raise _unauthenticated(_reason(exc)) from None
        return self._principal(claims)

    def _algorithm(self, token: str) -> str:
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise _unauthenticated("malformed token") from None
        if not isinstance(alg, str) or alg.lower() == "none":
            raise _unauthenticated("unsigned tokens (alg none) are not accepted")
        if alg not in self._keys:
            raise _unauthenticated(f"token algorithm {alg[:16]!r} is not accepted")
        return alg

    def _principal(self, claims: dict[str, Any]) -> Principal:
        tenant = claims.get(self.tenant_claim)
        if tenant is None or tenant == "":
            raise _unauthenticated(f"token lacks the {self.tenant_claim!r} claim")
        if not is_valid_tenant(tenant):
            raise _unauthenticated(f"token {self.tenant_claim!r} claim must be {TENANT_RULE}")
        return Principal(
            tenant=tenant,
            subject=claims.get("sub") or tenant,  # PyJWT has checked that a present sub is a str
            scopes=_scopes(self.scope_claim, claims.get(self.scope_claim)),
            method="jwt",
        )


# -- API keys ------------------------------------------------------------------------------

API_KEY_PREFIX = "isk"
_API_KEY = re.compile(rf"{API_KEY_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43,128}})")
# The one answer to every bad key (malformed, unknown, revoked, wrong secret): a different
# answer per case would tell a caller which key ids exist.
INVALID_API_KEY = "invalid API key"
_NO_HASH = "0" * 64  # compared against when a key has no stored hash, to do the same work


def new_api_key() -> tuple[str, str, str]:
    """(key_id, secret, full key): a 48-bit id to look the key up, a 256-bit secret."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{API_KEY_PREFIX}_{key_id}_{secret}"


def parse_api_key(full: str) -> tuple[str, str]:
    match = _API_KEY.fullmatch(full)
    if match is None:
        log.debug("API key refused: not %s_<key id>_<secret>", API_KEY_PREFIX)
        raise _unauthenticated(INVALID_API_KEY)
    return match.group(1), match.group(2)


def hash_secret(secret: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), secret.encode(), hashlib.sha256).hexdigest()


def secret_matches(secret: str, stored: str, pepper: str) -> bool:
    return hmac.compare_digest(hash_secret(secret, pepper), stored)


# Cache entries: {"state": "active", "tenant", "scopes", "hash"} | {"state": "revoked"} |
# {"state": "unknown"}. Unknown ids are cached briefly so guessing does not hammer PostgreSQL.
_NEGATIVE_TTL_S = 5.0


class ApiKeyStore:
    """API keys in PostgreSQL, looked up through a Redis cache (`streams.storage.cache`).

    Revocation wins over the cache: revoke writes a "revoked" entry over whatever is cached, so
    a lookup that read the row just before the revoke cannot put the key back."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        pepper: str,
        cache_ttl_s: float = 30,
        key_prefix: str = "inferstream",
    ) -> None:
        if not pepper:
            raise ValueError("API keys need a non-empty pepper")
        self._pool = pool
        self._pepper = pepper
        negative_ttl_s = min(cache_ttl_s, _NEGATIVE_TTL_S)
        self._cache: ReadThroughCache[dict[str, Any]] = ReadThroughCache(
            redis, f"{key_prefix}:apikey", cache_ttl_s, orjson.dumps, orjson.loads,
            ttl_of=lambda entry: negative_ttl_s if entry["state"] == "unknown" else cache_ttl_s,
        )

    async def create(self, tenant: str, scopes: list[str], name: str = "") -> str:
        """A new key; the full key is returned only here, the table keeps its hash. ValueError
        when the tenant or a scope breaks the rules every token claim is held to."""
        check_tenant_and_scopes(tenant, list(scopes))
        key_id, secret, full = new_api_key()
        await self._pool.execute(
            "INSERT INTO api_keys (key_id, tenant, scopes, name, secret_hash) VALUES ($1, $2, $3, $4, $5)",
            key_id, tenant, list(scopes), name, hash_secret(secret, self._pepper),
        )
        return full

    async def list(self, tenant: str | None = None) -> list[dict[str, Any]]:
        rows = await self._pool.fetch(
            "SELECT key_id, tenant, scopes, name, created_at, revoked_at FROM api_keys"
            " WHERE $1::text IS NULL OR tenant = $1 ORDER BY created_at, key_id",
            tenant,
        )
        return [dict(row) for row in rows]

    async def revoke(self, key_id: str) -> bool:
        """True when the key was active. Raises if Redis cannot take the "revoked" entry: the key
        is then revoked in PostgreSQL, but a cached copy may serve for up to cache_ttl_s."""
        status = await self._pool.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL", key_id
        )
        await self._cache.put(key_id, {"state": "revoked"})
        return status == "UPDATE 1"

    async def verify(self, full_key: str) -> Principal:
        """The key's principal; UNAUTHENTICATED with INVALID_API_KEY for every bad key."""
        key_id, secret = parse_api_key(full_key)
        entry = await self._entry(key_id)
        matches = secret_matches(secret, entry.get("hash", _NO_HASH), self._pepper)
        if entry["state"] != "active" or not matches:
            why = "wrong secret" if entry["state"] == "active" else entry["state"]
            log.debug("API key %s refused: %s", key_id, why)
            raise _unauthenticated(INVALID_API_KEY)
        return Principal(tenant=entry["tenant"], subject=key_id, scopes=frozenset(entry["scopes"]), method="api_key")

    async def _entry(self, key_id: str) -> dict[str, Any]:
        return await self._cache.get(key_id, lambda: self._load(key_id))

    async def _load(self, key_id: str) -> dict[str, Any]:
        row = await self._pool.fetchrow(
            "SELECT tenant, scopes, secret_hash, revoked_at FROM api_keys WHERE key_id = $1", key_id
        )
        if row is None:
            return {"state": "unknown"}
        if row["revoked_at"] is not None:
            return {"state": "revoked"}
        return {"state": "active", "tenant": row["tenant"], "scopes": list(row["scopes"]), "hash": row["secret_hash"]}


# -- the auth stage ------------------------------------------------------------------------


class Authenticator:
    """Credentials to a Principal. Absent credentials are anonymous unless auth is required;
    credentials that are present but invalid are always rejected."""

    def __init__(self, jwt: JwtVerifier | None, keys: ApiKeyStore | None, required: bool) -> None:
        self.jwt = jwt
        self.keys = keys
        self.required = required

    async def authenticate(self, credentials: Credentials | None) -> Principal:
        authorization = credentials.authorization if credentials else None
        api_key = credentials.api_key if credentials else None
        if authorization is not None and api_key is not None:
            raise _unauthenticated("send a bearer token or an API key, not both")
        if authorization is not None:
            return self._bearer(authorization)
        if api_key is not None:
            if self.keys is None:
                raise _unauthenticated("API keys are not accepted here")
            return await self.keys.verify(api_key)
        if self.required:
            raise _unauthenticated("credentials required: a bearer token or an API key")
        return ANONYMOUS

    def _bearer(self, authorization: str) -> Principal:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated("authorization must be 'Bearer <token>'")
        if self.jwt is None:
            raise _unauthenticated("bearer tokens are not accepted here")
        return self.jwt.verify(token.strip())
