"""Idempotency by request id: the first admitted body of a request id wins.

The intake claims a request id when it admits the request: the claim records a digest of what
was asked (tenant, model, version, inputs, parameters) and where the request was read (topic,
partition, offset). Another event with the same id is then
- a **redelivery** (same place): processed again, counted against no limit;
- a **repeat** (same digest, another place): answered from the stored result, or processed again
  without counting while there is none;
- a **conflict** (another digest): refused with DUPLICATE_REQUEST, the stored row untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import asyncpg
import numpy as np
import orjson

from topics.events import InferenceRequest
from topics.tensors import serialize_bytes


class Seen(Enum):
    NEW = "new"
    REDELIVERY = "redelivery"
    REPEAT = "repeat"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Claim:
    request_id: str
    digest: bytes
    source: str  # "<topic>:<partition>:<offset>" of the event that was admitted


def request_digest(request: InferenceRequest, tenant: str | None, tensors: dict[str, np.ndarray]) -> bytes:
    """What a request asks, whatever its encoding (binary or JSON tensors), deadline, reply
    address or credentials: a retry with fresh credentials and deadline is the same request."""
    digest = hashlib.sha256()
    asked = {
        "tenant": tenant, "model": request.model, "version": request.version, "inputs_ref": request.inputs_ref,
        "parameters": request.parameters, "batch_id": request.batch_id, "shadow_of": request.shadow_of,
        "replay_of": request.replay_of.model_dump() if request.replay_of else None,
        "tensors": [(name, str(a.dtype), list(a.shape)) for name, a in sorted(tensors.items())],
    }
    digest.update(orjson.dumps(asked, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS))
    for name, array in sorted(tensors.items()):
        # A bytes tensor (object array) by its elements: its own buffer holds only pointers.
        digest.update(serialize_bytes(array, name) if array.dtype.kind == "O" else np.ascontiguousarray(array).data)
    return digest.digest()


def seen(existing: Claim | None, digest: bytes, source: str) -> Seen:
    if existing is None:
        return Seen.NEW
    if existing.source == source:
        return Seen.REDELIVERY
    return Seen.REPEAT if existing.digest == digest else Seen.CONFLICT


class RequestClaims:
    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        self._pool = pool  # the results store's pool, once started

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool()

    async def get(self, request_ids: list[str]) -> dict[str, Claim]:
        if not request_ids:
            return {}
        rows = await self.pool.fetch(
            "SELECT request_id, digest, source FROM request_claims WHERE request_id = ANY($1::text[])", request_ids,
        )
        return {r["request_id"]: Claim(r["request_id"], bytes(r["digest"]), r["source"]) for r in rows}

    async def claim(self, claims: list[Claim]) -> set[str]:
        """Record the claims whose ids are free; the ids recorded now."""
        if not claims:
            return set()
        rows = await self.pool.fetch(
            "INSERT INTO request_claims (request_id, digest, source)"
            " SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[])"
            " ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
            [c.request_id for c in claims], [c.digest for c in claims], [c.source for c in claims],
        )
        return {r["request_id"] for r in rows}
