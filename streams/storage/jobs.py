"""Jobs and batch jobs in PostgreSQL (tables from `streams.storage.schema`); their results are in
`streams.storage.results`."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


class BatchStatus:
    PENDING = "pending"  # accepted, not picked up by a worker yet
    RUNNING = "running"  # items being published or answered
    COMPLETED = "completed"  # every item answered; output written
    INCOMPLETE = "incomplete"  # gave up waiting for some items (batch_timeout_s)
    FAILED = "failed"  # the input could not be read
    FINAL = (COMPLETED, INCOMPLETE, FAILED)


@dataclass
class Batch:
    batch_id: str
    model: str
    version: str | None
    input: str
    rate: float
    status: str
    total: int | None
    published: int
    output_ref: str | None
    error: str | None
    tenant: str


class JobStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def add_job(self, job_id: str, model: str, version: str | None, tenant: str) -> None:
        await self.pool.execute(
            "INSERT INTO inference_jobs (job_id, model, version, tenant) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (job_id) DO NOTHING", job_id, model, version, tenant,
        )

    async def job_tenant(self, job_id: str) -> str | None:
        """Whose job this is; None when there is no such job."""
        return await self.pool.fetchval("SELECT tenant FROM inference_jobs WHERE job_id = $1", job_id)

    async def add_batch(self, batch_id: str, model: str, version: str | None, input_uri: str, rate: float,
                        total: int, tenant: str) -> None:
        await self.pool.execute(
            "INSERT INTO inference_batches (batch_id, model, version, input, rate, status, total, tenant)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            batch_id, model, version, input_uri, rate, BatchStatus.PENDING, total, tenant,
        )

    async def batch(self, batch_id: str) -> Batch | None:
        row = await self.pool.fetchrow(
            "SELECT batch_id, model, version, input, rate, status, total, published, output_ref, error, tenant"
            " FROM inference_batches WHERE batch_id = $1", batch_id,
        )
        return Batch(**dict(row)) if row else None

    async def update_batch(self, batch_id: str, **fields: object) -> None:
        columns = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
        await self.pool.execute(
            f"UPDATE inference_batches SET {columns}, updated_at = now() WHERE batch_id = $1",
            batch_id, *fields.values(),
        )
