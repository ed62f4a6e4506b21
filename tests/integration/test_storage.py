"""The storage package against the real PostgreSQL: the schema's migrations (on an empty database,
over every state the code before numbered migrations left a database in, twice, and from several
connections at once), and the results store's reads."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from infra.local.harness import create_database, drop_database
from streams.settings import Settings
from streams.storage.results import ResultsStore, StoredResult
from streams.storage.schema import MIGRATIONS, migrate
from topics.errors import ErrorCode
from topics.events import ErrorInfo, InferenceResult, Status

pytestmark = pytest.mark.integration

# The previous code's migrations as it ran them, each recorded in `inferstream_schema`.
LEGACY_MIGRATIONS = [
    """
    CREATE TABLE inference_results (
        request_id text PRIMARY KEY, correlation_id text, model text, model_version text,
        status text NOT NULL, error_code text, error_message text, outputs bytea, outputs_ref text,
        timings_ms jsonb NOT NULL DEFAULT '{}'::jsonb, batch_size integer, tenant text,
        created_at timestamptz, completed_at timestamptz NOT NULL, stored_at timestamptz NOT NULL DEFAULT now(),
        source_partition integer, source_offset bigint
    );
    CREATE INDEX inference_results_model_completed ON inference_results (model, completed_at);
    """,
    """
    ALTER TABLE inference_results ADD COLUMN batch_id text;
    CREATE INDEX inference_results_batch ON inference_results (batch_id) WHERE batch_id IS NOT NULL;
    CREATE TABLE inference_jobs (job_id text PRIMARY KEY, model text NOT NULL, version text,
                                 created_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE inference_batches (
        batch_id text PRIMARY KEY, model text NOT NULL, version text, input text NOT NULL, rate real NOT NULL,
        status text NOT NULL, total integer, published integer NOT NULL DEFAULT 0, output_ref text, error text,
        created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    """
    CREATE TABLE model_versions (name text NOT NULL, version text NOT NULL, revision integer NOT NULL,
                                 doc jsonb NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(),
                                 PRIMARY KEY (name, version));
    ALTER TABLE inference_results ADD COLUMN shadow_of text;
    """,
    """
    CREATE TABLE IF NOT EXISTS api_keys (
        key_id text PRIMARY KEY, tenant text NOT NULL, scopes text[] NOT NULL, name text NOT NULL DEFAULT '',
        secret_hash text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), revoked_at timestamptz
    );
    CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant);
    CREATE TABLE IF NOT EXISTS tenant_limits (
        tenant text PRIMARY KEY, requests_per_minute integer NOT NULL CHECK (requests_per_minute >= 0),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    """
    CREATE TABLE IF NOT EXISTS request_claims (request_id text PRIMARY KEY, digest bytea NOT NULL,
                                               source text NOT NULL, claimed_at timestamptz NOT NULL DEFAULT now());
    """,
    """
    ALTER TABLE inference_jobs ADD COLUMN tenant text NOT NULL DEFAULT 'anonymous';
    ALTER TABLE inference_batches ADD COLUMN tenant text NOT NULL DEFAULT 'anonymous';
    """,
]
# Made by the previous code's first `dlq redrive`, not by its migrations.
LEGACY_REDRIVES = """
CREATE TABLE IF NOT EXISTS deadletter_redrives (
    topic text NOT NULL, partition integer NOT NULL, "offset" bigint NOT NULL, source_topic text NOT NULL,
    request_id text, redriven_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (topic, partition, "offset")
)
"""
TABLES = {"inference_results", "inference_jobs", "inference_batches", "model_versions", "api_keys",
          "tenant_limits", "request_claims", "deadletter_redrives"}
LATEST = [version for version, _ in MIGRATIONS]


async def new_database() -> str:
    dsn = f"{Settings().postgres_dsn}_schema_{uuid.uuid4().hex[:10]}"
    await create_database(dsn)
    return dsn


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """An empty database of the test's own."""
    dsn = await new_database()
    try:
        yield dsn
    finally:
        await drop_database(dsn)


async def shape(dsn: str) -> dict[str, set[tuple[str | None, ...]]]:
    """The product's tables as PostgreSQL describes them: columns (their order aside),
    constraints and indexes."""
    conn = await asyncpg.connect(dsn)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
            " WHERE table_schema = 'public'")
        constraints = await conn.fetch(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace")
        indexes = await conn.fetch("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {kind: {tuple(row) for row in rows if row[0] in TABLES}
            for kind, rows in (("columns", columns), ("constraints", constraints), ("indexes", indexes))}


async def recorded(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")]
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def migrated_shape() -> dict[str, set[tuple[str | None, ...]]]:
    """The shape of an empty database once migrated."""
    dsn = await new_database()
    try:
        assert await migrate(dsn) == LATEST
        return await shape(dsn)
    finally:
        await drop_database(dsn)


def test_versions_are_numbered_in_order():
    assert LATEST == list(range(1, len(MIGRATIONS) + 1))


async def test_an_empty_database_gets_every_table(database, migrated_shape):
    assert {column[0] for column in migrated_shape["columns"]} == TABLES
    assert await migrate(database) == LATEST
    assert await recorded(database) == LATEST
    assert await shape(database) == migrated_shape


@pytest.mark.parametrize("legacy_version", range(1, len(LEGACY_MIGRATIONS) + 1))
async def test_a_database_of_the_previous_code_is_brought_up_keeping_its_rows(database, migrated_shape,
                                                                           legacy_version):
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("CREATE TABLE inferstream_schema (version integer PRIMARY KEY,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")
        for version, statement in enumerate(LEGACY_MIGRATIONS[:legacy_version], start=1):
            await conn.execute(statement)
            await conn.execute("INSERT INTO inferstream_schema (version) VALUES ($1)", version)
        if legacy_version == len(LEGACY_MIGRATIONS):
            await conn.execute(LEGACY_REDRIVES)
        await conn.execute(
            "INSERT INTO inference_results (request_id, status, completed_at) VALUES ('old', 'ok', now())")
    finally:
        await conn.close()

    assert await migrate(database) == LATEST
    assert await shape(database) == migrated_shape
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SELECT status FROM inference_results WHERE request_id = 'old'") == "ok"
        # The old record stays, for the previous code: its schema is complete.
        assert await conn.fetchval("SELECT max(version) FROM inferstream_schema") == legacy_version
    finally:
        await conn.close()


async def test_migrating_again_changes_nothing(database, migrated_shape):
    assert await migrate(database) == LATEST
    assert await migrate(database) == []
    assert await recorded(database) == LATEST
    assert await shape(database) == migrated_shape


async def test_processes_starting_together_migrate_once(database, migrated_shape):
    applied = await asyncio.gather(*(migrate(database) for _ in range(4)))
    assert sorted(applied) == [[], [], [], LATEST]
    assert await recorded(database) == LATEST
    assert await shape(database) == migrated_shape


# -- the results store ---------------------------------------------------------------------


def result(request_id: str, ok: bool = True, batch_id: str | None = None) -> StoredResult:
    error = None if ok else ErrorInfo(code=ErrorCode.INFERENCE_FAILED, message="failed")
    return StoredResult(InferenceResult(request_id=request_id, model="tiny", status=Status.OK if ok else Status.ERROR,
                                        error=error, tenant="acme", batch_id=batch_id), b"bundle" if ok else None)


@pytest.fixture
async def results(database) -> AsyncIterator[ResultsStore]:
    await migrate(database)
    async with ResultsStore(database) as store:
        yield store


async def test_waiting_ends_once_every_result_is_stored(results):
    waiting = asyncio.create_task(results.wait_until_stored(["a", "b"], timeout_s=60))
    await results.upsert([result("a")])
    await results.upsert([result("b", ok=False)])
    started = time.monotonic()
    stored = await asyncio.wait_for(waiting, 10)
    assert time.monotonic() - started < 5
    assert {rid: row["status"] for rid, row in stored.items()} == {"a": "ok", "b": "error"}


async def test_waiting_gives_what_is_stored_when_its_time_is_up(results):
    await results.upsert([result("a")])
    started = time.monotonic()
    assert set(await results.wait_until_stored(["a", "never"], timeout_s=0.5)) == {"a"}
    assert 0.5 <= time.monotonic() - started < 5


async def test_reads_of_the_results(results):
    await results.upsert([result("b-1", batch_id="b"), result("b-2", ok=False, batch_id="b"), result("x")])
    await results.upsert([result("b-1", ok=False, batch_id="b")])  # an answer is never replaced by an error
    assert (await results.get("b-1"))["outputs"] == b"bundle"
    assert set(await results.rows(["b-1", "x", "missing"])) == {"b-1", "x"}
    assert set(await results.answered(["b-1", "b-2"])) == {"b-1"}
    assert {rid: dict(row) for rid, row in (await results.outcomes(["b-2", "x"])).items()} == {
        "b-2": {"request_id": "b-2", "status": "error", "tenant": "acme"},
        "x": {"request_id": "x", "status": "ok", "tenant": "acme"}}
    assert await results.batch_progress("b") == (1, 1)
