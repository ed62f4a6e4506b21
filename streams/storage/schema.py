"""Every table of the product, as numbered migrations applied in order, each once, recorded in
`schema_migrations`. `migrate` is called by whoever starts on a database (the worker's bootstrap,
the bridge, the CLI); the stores only read and write rows.

To change a table, append a migration (the next version) and never edit an applied one: a
database keeps the versions it has, and each process applies what it lacks at start.

Migration 1 is the schema as the code before numbered migrations left it, written to be applied
over any of its states (CREATE ... IF NOT EXISTS, ADD COLUMN IF NOT EXISTS): such a database
keeps its rows. Its old record, the table `inferstream_schema`, is left where it is, so that
older code still finds its schema complete.
"""

from __future__ import annotations

import asyncpg

Migration = tuple[int, tuple[str, ...]]

MIGRATIONS: list[Migration] = [
    (1, (
        # One row per request id (streams.storage.results).
        """
        CREATE TABLE IF NOT EXISTS inference_results (
            request_id       text PRIMARY KEY,
            correlation_id   text,
            model            text,
            model_version    text,
            status           text NOT NULL,
            error_code       text,
            error_message    text,
            outputs          bytea,
            outputs_ref      text,
            timings_ms       jsonb NOT NULL DEFAULT '{}'::jsonb,
            batch_size       integer,
            tenant           text,
            created_at       timestamptz,
            completed_at     timestamptz NOT NULL,
            stored_at        timestamptz NOT NULL DEFAULT now(),
            source_partition integer,
            source_offset    bigint,
            batch_id         text,
            shadow_of        text
        )
        """,
        # Columns that databases made before them lack.
        """
        ALTER TABLE inference_results ADD COLUMN IF NOT EXISTS batch_id text,
                                      ADD COLUMN IF NOT EXISTS shadow_of text
        """,
        "CREATE INDEX IF NOT EXISTS inference_results_model_completed ON inference_results (model, completed_at)",
        "CREATE INDEX IF NOT EXISTS inference_results_batch ON inference_results (batch_id) WHERE batch_id IS NOT NULL",
        # Jobs and batch jobs (streams.storage.jobs); earlier ones belong to the anonymous tenant.
        """
        CREATE TABLE IF NOT EXISTS inference_jobs (
            job_id      text PRIMARY KEY,
            model       text NOT NULL,
            version     text,
            created_at  timestamptz NOT NULL DEFAULT now(),
            tenant      text NOT NULL DEFAULT 'anonymous'
        )
        """,
        """
        CREATE TABLE IF NOT EXISTS inference_batches (
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
            updated_at  timestamptz NOT NULL DEFAULT now(),
            tenant      text NOT NULL DEFAULT 'anonymous'
        )
        """,
        "ALTER TABLE inference_jobs ADD COLUMN IF NOT EXISTS tenant text NOT NULL DEFAULT 'anonymous'",
        "ALTER TABLE inference_batches ADD COLUMN IF NOT EXISTS tenant text NOT NULL DEFAULT 'anonymous'",
        # The registry's source of truth (streams.registry.store).
        """
        CREATE TABLE IF NOT EXISTS model_versions (
            name        text NOT NULL,
            version     text NOT NULL,
            revision    integer NOT NULL,
            doc         jsonb NOT NULL,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (name, version)
        )
        """,
        # API keys: only an HMAC of the secret (streams.gate.auth).
        """
        CREATE TABLE IF NOT EXISTS api_keys (
            key_id      text PRIMARY KEY,
            tenant      text NOT NULL,
            scopes      text[] NOT NULL,
            name        text NOT NULL DEFAULT '',
            secret_hash text NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz
        )
        """,
        "CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant)",
        # Per-tenant rate limits (streams.gate.ratelimit).
        """
        CREATE TABLE IF NOT EXISTS tenant_limits (
            tenant              text PRIMARY KEY,
            requests_per_minute integer NOT NULL CHECK (requests_per_minute >= 0),
            updated_at          timestamptz NOT NULL DEFAULT now()
        )
        """,
        # The first admitted body of each request id (streams.storage.claims).
        """
        CREATE TABLE IF NOT EXISTS request_claims (
            request_id  text PRIMARY KEY,
            digest      bytea NOT NULL,
            source      text NOT NULL,
            claimed_at  timestamptz NOT NULL DEFAULT now()
        )
        """,
        # Dead letters sent back to their source, once each (streams.ops.dlq).
        """
        CREATE TABLE IF NOT EXISTS deadletter_redrives (
            topic        text NOT NULL,
            partition    integer NOT NULL,
            "offset"     bigint NOT NULL,
            source_topic text NOT NULL,
            request_id   text,
            redriven_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (topic, partition, "offset")
        )
        """,
    )),
]

# Advisory lock: one migrator at a time, however many processes start together.
_LOCK_ID = 0x1F5E_A3


async def migrate(dsn: str) -> list[int]:
    """Apply the migrations this database lacks, in one transaction; the versions applied now."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            # Taken before the record is created: two first starts must not both create it.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            missing = [(version, statements) for version, statements in MIGRATIONS if version not in applied]
            for version, statements in missing:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        return [version for version, _ in missing]
    finally:
        await conn.close()
