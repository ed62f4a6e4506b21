"""Results in PostgreSQL: one row per request id, written in batches by idempotent upserts, so a
redelivered result never makes a second row. The schema is created and migrated by the code."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from streams.gate.auth import API_KEYS_DDL
from streams.gate.ratelimit import TENANT_LIMITS_DDL
from streams.storage.claims import CLAIMS_DDL
from topics.events import InferenceResult

# Each entry runs once, in order, recorded in inferstream_schema.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE inference_results (
        request_id      text PRIMARY KEY,
        correlation_id  text,
        model           text,
        model_version   text,
        status          text NOT NULL,
        error_code      text,
        error_message   text,
        outputs         bytea,
        outputs_ref     text,
        timings_ms      jsonb NOT NULL DEFAULT '{}'::jsonb,
        batch_size      integer,
        tenant          text,
        created_at      timestamptz,
        completed_at    timestamptz NOT NULL,
        stored_at       timestamptz NOT NULL DEFAULT now(),
        source_partition integer,
        source_offset   bigint
    );
    CREATE INDEX inference_results_model_completed ON inference_results (model, completed_at);
    """,
    """
    ALTER TABLE inference_results ADD COLUMN batch_id text;
    CREATE INDEX inference_results_batch ON inference_results (batch_id) WHERE batch_id IS NOT NULL;
    CREATE TABLE inference_jobs (
        job_id      text PRIMARY KEY,
        model       text NOT NULL,
        version     text,
        created_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE inference_batches (
        batch_id    text PRIMARY KEY,
        model       text NOT NULL,
        version     text,
        input       text NOT NULL,
        rate        real NOT NULL,
        status      text NOT NULL,
        total       integer,
        published   integer NOT NULL DEFAULT 0,
        output_ref  text,
        error       text,
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    """,
    """
    CREATE TABLE model_versions (
        name        text NOT NULL,
        version     text NOT NULL,
        revision    integer NOT NULL,
        doc         jsonb NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (name, version)
    );
    ALTER TABLE inference_results ADD COLUMN shadow_of text;
    """,
    API_KEYS_DDL + TENANT_LIMITS_DDL,
    CLAIMS_DDL,
    # Jobs and batches belong to the tenant that submitted them (earlier ones: anonymous).
    """
    ALTER TABLE inference_jobs ADD COLUMN tenant text NOT NULL DEFAULT 'anonymous';
    ALTER TABLE inference_batches ADD COLUMN tenant text NOT NULL DEFAULT 'anonymous';
    """,
]

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

_LOCK_ID = 0x1F5E_A3  # advisory lock: one migrator at a time across workers


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


async def migrate(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS inferstream_schema (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = await conn.fetchval("SELECT coalesce(max(version), 0) FROM inferstream_schema")
        for version, statement in enumerate(MIGRATIONS, start=1):
            if version > applied:
                await conn.execute(statement)
                await conn.execute("INSERT INTO inferstream_schema (version) VALUES ($1)", version)


class ResultsStore:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)
        async with self._pool.acquire() as conn:
            await migrate(conn)

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

    async def answered(self, request_ids: list[str]) -> dict[str, asyncpg.Record]:
        """The stored `ok` results of these request ids."""
        rows = await self.pool.fetch(
            "SELECT * FROM inference_results WHERE request_id = ANY($1::text[]) AND status = 'ok'", request_ids,
        )
        return {row["request_id"]: row for row in rows}

    async def get(self, request_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM inference_results WHERE request_id = $1", request_id)
