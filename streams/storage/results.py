"""Results in PostgreSQL: one row per request id, written in batches by idempotent upserts, so a
redelivered result never makes a second row. Every read of the results table is a method here."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from streams.lifecycle import Service
from topics.events import InferenceResult

_UPSERT = """
INSERT INTO inference_results (request_id, correlation_id, model, model_version, status,
    error_code, error_message, outputs, outputs_ref, timings_ms, batch_size, tenant,
    created_at, completed_at, source_partition, source_offset, batch_id, shadow_of)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11, $12, $13, $14, $15, $16, $17, $18)
ON CONFLICT (request_id) DO UPDATE SET
    correlation_id = EXCLUDED.correlation_id, model = EXCLUDED.model,
    model_version = EXCLUDED.model_version, status = EXCLUDED.status,
    error_code = EXCLUDED.error_code, error_message = EXCLUDED.error_message,
    outputs = EXCLUDED.outputs, outputs_ref = EXCLUDED.outputs_ref,
    timings_ms = EXCLUDED.timings_ms, batch_size = EXCLUDED.batch_size, tenant = EXCLUDED.tenant,
    created_at = EXCLUDED.created_at, completed_at = EXCLUDED.completed_at,
    source_partition = EXCLUDED.source_partition, source_offset = EXCLUDED.source_offset,
    batch_id = EXCLUDED.batch_id, shadow_of = EXCLUDED.shadow_of, stored_at = now()
-- An answered request keeps its answer: a later error for the same id never replaces it.
WHERE inference_results.status <> 'ok' OR EXCLUDED.status = 'ok'
"""
_POLL_S = 0.25  # how often `wait_until_stored` counts the rows stored


@dataclass
class StoredResult:
    result: InferenceResult
    outputs: bytes | None  # tensor bundle (topics.events.decode_bundle) when stored inline
    partition: int | None = None
    offset: int | None = None


def _ts(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _row(item: StoredResult) -> tuple[Any, ...]:
    r = item.result
    return (
        r.request_id, r.correlation_id, r.model, r.model_version, r.status.value,
        r.error.code.value if r.error else None, r.error.message if r.error else None,
        item.outputs, r.outputs_ref, orjson.dumps(r.timings_ms).decode(), r.batch_size, r.tenant,
        _ts(r.created_ms), _ts(r.completed_ms), item.partition, item.offset, r.batch_id, r.shadow_of,
    )


class ResultsStore(Service):
    """The results table (made by `streams.storage.schema.migrate`), over a pool of its own that
    the other stores of a process share."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        if self._pool is not None:
            return
        self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("ResultsStore is not started")
        return self._pool

    async def upsert(self, items: list[StoredResult]) -> None:
        # A request id seen twice in one batch (a redelivery) keeps its last result.
        latest = {item.result.request_id: item for item in items}
        async with self.pool.acquire() as conn:
            await conn.executemany(_UPSERT, [_row(i) for i in latest.values()])

    async def get(self, request_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM inference_results WHERE request_id = $1", request_id)

    async def rows(self, request_ids: list[str]) -> dict[str, asyncpg.Record]:
        """The stored results of these request ids, by id."""
        rows = await self.pool.fetch("SELECT * FROM inference_results WHERE request_id = ANY($1::text[])", request_ids)
        return {row["request_id"]: row for row in rows}

    async def answered(self, request_ids: list[str]) -> dict[str, asyncpg.Record]:
        """The stored `ok` results of these request ids."""
        rows = await self.pool.fetch(
            "SELECT * FROM inference_results WHERE request_id = ANY($1::text[]) AND status = 'ok'", request_ids,
        )
        return {row["request_id"]: row for row in rows}

    async def outcomes(self, request_ids: list[str]) -> dict[str, asyncpg.Record]:
        """(status, tenant) of the stored results of these request ids, without their outputs."""
        rows = await self.pool.fetch(
            "SELECT request_id, status, tenant FROM inference_results WHERE request_id = ANY($1::text[])", request_ids,
        )
        return {row["request_id"]: row for row in rows}

    async def batch_progress(self, batch_id: str) -> tuple[int, int]:
        """(answered ok, answered with an error) items of a batch job."""
        row = await self.pool.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'ok') AS done,"
            " count(*) FILTER (WHERE status <> 'ok') AS failed"
            " FROM inference_results WHERE batch_id = $1", batch_id,
        )
        return row["done"], row["failed"]

    async def wait_until_stored(self, request_ids: list[str], timeout_s: float = 60.0) -> dict[str, asyncpg.Record]:
        """The stored results of these request ids once all are stored, or `timeout_s` has passed
        (results are stored asynchronously, after their answer)."""
        expect = len(set(request_ids))
        count = "SELECT count(*) FROM inference_results WHERE request_id = ANY($1::text[])"
        deadline = time.monotonic() + timeout_s
        while await self.pool.fetchval(count, request_ids) < expect and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        return await self.rows(request_ids)
