"""Whole chunks end to end on the real stack: a chunk's bad request is rejected alone, a worker
killed mid-chunk loses and duplicates nothing, and a model served by another worker group still
goes through its topic."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
from support.deadletters import dead_letters_of
from support.model_repositories import pooled_repository
from support.topics import topic_records
from support.waiting import wait_for

from infra.local.harness import tiny_input, wait_ready
from streams.client import InferenceClient
from streams.ops.dlq import Letter, read_letters
from streams.worker.app import bootstrap_registry
from topics.errors import ErrorCode
from topics.events import Status
from topics.names import Topics

pytestmark = pytest.mark.integration
FAULTS = Path(__file__).parent / "faults"


async def test_a_chunk_of_100_with_one_poison_event_answers_99_and_dead_letters_1(start_worker, settings, monkeypatch):
    """The 100 requests are on the requests topic before the worker starts, so its first chunks
    hold them all; the one that meets a bug inside the intake's step is dead-lettered alone."""
    marker = f"poison-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PYTHONPATH", str(FAULTS))
    monkeypatch.setenv("INFERSTREAM_FAULT_BUG_MARKER", marker)
    async with InferenceClient(settings) as client:
        requests = [client.request("tiny", timeout=120) for _ in range(100)]
        requests[37].request_id = f"{marker}-{requests[37].request_id}"
        waiters = [await client.send(r, tiny_input(seed=i), delivered=True) for i, r in enumerate(requests)]
        start_worker()
        results = await asyncio.wait_for(asyncio.gather(*waiters), 120)
        await dead_letters_of(settings, {requests[37].request_id})
        letters = [x for x in await read_letters(settings) if isinstance(x, Letter)]
    outcomes = Counter(r.header.error.code if r.header.error else r.header.status for r in results)
    assert outcomes == {Status.OK: 99, ErrorCode.INTERNAL: 1}, outcomes
    assert results[37].header.status == Status.ERROR
    assert [x.letter.request_id for x in letters] == [requests[37].request_id]


async def test_worker_killed_mid_chunk_under_10000_requests_loses_and_duplicates_nothing(start_worker, settings):
    total = 10_000
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        requests = [client.request("tiny", timeout=600) for _ in range(total)]
        waiters: list[asyncio.Future] = []

        async def stream() -> None:
            for i, request in enumerate(requests):
                waiters.append(await client.send(request, tiny_input(seed=i)))
                if i % 500 == 499:
                    await asyncio.sleep(0)  # let replies in while the stream goes on

        sending = asyncio.create_task(stream())
        # SIGKILL (nothing finishes cleanly) while the stream flows and chunks are in flight.
        await wait_for(lambda: sum(w.done() for w in waiters) >= total // 10, timeout=60,
                       what=f"{total // 10} answers")
        answered_before_kill = sum(w.done() for w in waiters)
        worker.kill()
        start_worker()
        await asyncio.wait_for(sending, 300)
        results = await asyncio.wait_for(asyncio.gather(*waiters), 600)
    assert total // 10 <= answered_before_kill < total, answered_before_kill
    assert Counter(r.header.status for r in results) == {Status.OK: total}
    assert {r.header.request_id for r in results} == {r.request_id for r in requests}
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        rows, distinct, claims = await wait_for(
            lambda: conn.fetchrow(
                "SELECT count(*), count(DISTINCT request_id),"
                " (SELECT count(*) FROM request_claims WHERE request_id = ANY($1::text[]))"
                " FROM inference_results WHERE request_id = ANY($1::text[])", [r.request_id for r in requests]),
            timeout=120, interval=0.5, until=lambda counts: counts[0] >= total, what=f"{total} rows stored")
    finally:
        await conn.close()
    assert (rows, distinct, claims) == (total, total, total)


async def test_a_model_served_by_another_worker_group_goes_through_its_topic(start_worker, settings, tmp_path):
    """A worker that serves only `tiny` routes requests for a model it does not serve to that
    model's topic; a worker of the pool that serves it answers them from there."""
    name = "pooled"
    pool_settings = settings.model_copy(update={
        "model_repository": pooled_repository(settings.model_repository, tmp_path / "pool-repo", name),
        "models": [name]})
    await bootstrap_registry(pool_settings)  # registered, its topic created, as the pool's workers do
    front = start_worker(models=["tiny"])
    topic = Topics(settings.topic_prefix).model(name)
    async with InferenceClient(settings) as client:
        await wait_ready(client, front)
        requests = [client.request(name, timeout=180) for _ in range(50)]
        waiters = [await client.send(r, tiny_input(seed=i)) for i, r in enumerate(requests)]
        on_topic = await wait_for(lambda: topic_records(settings, topic), timeout=60, interval=0.2,
                                  until=lambda records: len(records) >= len(requests),
                                  what="the requests forwarded to the model's topic")
        assert len(on_topic) == len(requests)
        assert not any(w.done() for w in waiters), "answered before a worker serving the model started"
        start_worker(models=[name], model_repository=pool_settings.model_repository)
        results = await asyncio.wait_for(asyncio.gather(*waiters), 150)
    assert Counter(r.header.status for r in results) == {Status.OK: len(requests)}
    assert {r.header.model for r in results} == {name}
