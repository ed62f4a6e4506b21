"""Chaos on the real stack under a steady stream of requests, some of them large enough to travel
through S3 both ways (claim checks): a worker is SIGKILLed with another beside it, the S3 server
is SIGKILLed and restarted on the same ports and data, and the broker (durable S3 storage) is
SIGKILLed and restarted on the same port and storage. Every request the broker acknowledged must
be answered and stored, once."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import urllib3
from minio.error import MinioException
from support.waiting import wait_for

from infra.local.harness import Worker, drop_database, isolated_settings, tiny_input, wait_ready
from infra.local.stack import LocalStack
from streams.client import InferenceClient, ReplyTimeout, UpstreamUnavailable
from streams.settings import Settings
from streams.storage.results import ResultsStore
from streams.worker.app import bootstrap_registry
from topics.events import InferenceRequest, Result

pytestmark = pytest.mark.integration

RATE = 20  # requests per second
DURATION_S = 36
# Outputs over 4 KiB go to S3 (the worker's claim check), inputs over 16 KiB (the client's). Every
# LARGE_EVERY-th request is large: 128 rows (8 KiB, S3 on the way out) or 512 rows (32 KiB, S3 both
# ways), so that during an S3 outage the worker has outputs to write as well as inputs to read.
WORKER_CLAIM_CHECK_BYTES = 4096
CLIENT_CLAIM_CHECK_BYTES = 16384
LARGE_EVERY = 5
LARGE_ROWS = (128, 512)
REQUEST_TIMEOUT_S = 240
S3_OUTAGE_S = 10
BROKER_OUTAGE_S = 5
# Workers must answer again this soon after the broker is back from a restart.
BROKER_RESUME_S = 30
# What Faust logs when an agent raises (mode's Service.crash) and when its supervisor restarts it.
CRASH = re.compile(r"Crashed reason=|Restarting dead")
# A send the client could not complete: the broker or (for a claim check) S3 did not take it.
NOT_SENT = (UpstreamUnavailable, MinioException, urllib3.exceptions.HTTPError, OSError)

Chaos = Callable[[], Awaitable[None] | None]


def client_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"claim_check_bytes": CLIENT_CLAIM_CHECK_BYTES})


@dataclass
class Stream:
    requests: list[InferenceRequest] = field(default_factory=list)
    sends: list[asyncio.Task] = field(default_factory=list)
    chaos: list[asyncio.Task] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # loop time of each send
    answered_at: dict[int, float] = field(default_factory=dict)  # loop time of each reply, by index

    def note_reply(self, index: int, send: asyncio.Task) -> None:
        """Record when request `index` is answered (its send task resolves to the reply's future)."""
        if send.cancelled() or send.exception() is not None:
            return
        loop = asyncio.get_running_loop()

        def answered(reply: asyncio.Future) -> None:
            if not reply.cancelled() and reply.exception() is None:
                self.answered_at.setdefault(index, loop.time())

        send.result().add_done_callback(answered)


async def steady_stream(client: InferenceClient, at: dict[float, Chaos]) -> Stream:
    """RATE requests a second for DURATION_S, every LARGE_EVERY-th through S3; `at[t]()` runs t
    seconds in (its coroutine, if any, as a task). Each send is a task of its own, so a slow
    claim check (S3 down) does not hold the stream up."""
    loop = asyncio.get_running_loop()
    stream = Stream()
    start = loop.time()
    pending = sorted(at.items())
    for i in range(RATE * DURATION_S):
        while pending and loop.time() - start >= pending[0][0]:
            outcome = pending.pop(0)[1]()
            if outcome is not None:
                stream.chaos.append(asyncio.ensure_future(outcome))
        rows = LARGE_ROWS[i // LARGE_EVERY % 2] if i % LARGE_EVERY == 0 else 1
        request = client.request("tiny", timeout=REQUEST_TIMEOUT_S)
        stream.requests.append(request)
        stream.sent_at.append(loop.time())
        send = asyncio.create_task(client.send(request, tiny_input(rows=rows, seed=i)))
        send.add_done_callback(lambda task, index=i: stream.note_reply(index, task))
        stream.sends.append(send)
        await asyncio.sleep(max(0.0, start + (i + 1) / RATE - loop.time()))
    await asyncio.gather(*stream.chaos)
    return stream


async def settle(client: InferenceClient, stream: Stream) -> dict[str, Any]:
    """Every request's fate: not acknowledged, answered (ok or error), or timed out."""
    async def fate(request: InferenceRequest, send: asyncio.Task) -> Result | BaseException:
        try:
            return await client.wait(request, await send)
        except (*NOT_SENT, ReplyTimeout) as exc:
            return exc

    fates = await asyncio.gather(*(fate(r, s) for r, s in zip(stream.requests, stream.sends)))
    acknowledged = [(r, f) for r, f in zip(stream.requests, fates) if not isinstance(f, NOT_SENT)]
    ok = [f for _, f in acknowledged if isinstance(f, Result) and f.header.status == "ok"]
    errors = [f for _, f in acknowledged if isinstance(f, Result) and f.header.status != "ok"]
    return {
        "acknowledged": [r for r, _ in acknowledged],
        "ok": ok,
        "errors": errors,
        "timed_out": [r for r, f in acknowledged if isinstance(f, ReplyTimeout)],
        "not_acknowledged": [f for f in fates if isinstance(f, NOT_SENT)],
    }


async def figures_of(name: str, settings: Settings, client: InferenceClient, stream: Stream,
                     workers: list[Worker], tmp_path: Path) -> dict[str, Any]:
    fates = await settle(client, stream)
    acknowledged = fates["acknowledged"]
    async with ResultsStore(settings.postgres_dsn) as results:  # one row per request id: the table's key
        rows = len(await results.wait_until_stored([r.request_id for r in acknowledged], timeout_s=120))
    by_ref = [r for r in fates["ok"] if r.header.outputs_ref]
    unreadable = 0
    for result in by_ref:
        try:
            await client.outputs(result)
        except Exception:  # noqa: BLE001 - counted: an output the caller cannot fetch is lost
            unreadable += 1
    logs = [line for w in workers for line in w.log().splitlines()]
    crash_lines = [line for line in logs if CRASH.search(line)]
    figures = {
        "sent": len(stream.requests), "acknowledged": len(acknowledged),
        "not_acknowledged": len(fates["not_acknowledged"]), "answered_ok": len(fates["ok"]),
        "answered_error": len(fates["errors"]), "timed_out": len(fates["timed_out"]),
        "lost": len(acknowledged) - len(fates["ok"]), "rows": rows, "unstored": len(acknowledged) - rows,
        "inputs_by_ref": sum(1 for r in acknowledged if r.inputs_ref), "outputs_by_ref": len(by_ref),
        "unreadable_outputs": unreadable, "crash_lines": len(crash_lines),
        "step_retries": sum("service unavailable" in line for line in logs),
    }
    details = {
        "figures": figures,
        "errors": [r.header.model_dump(mode="json", include={"request_id", "error"}) for r in fates["errors"][:20]],
        "timed_out": [r.request_id for r in fates["timed_out"][:50]],
        "not_acknowledged": [repr(e)[:300] for e in fates["not_acknowledged"][:20]],
        "crash_lines": crash_lines[:20],
    }
    path = tmp_path / f"chaos-{name}.json"
    path.write_text(json.dumps(details, indent=1))
    print(f"\nCHAOS {name} " + " ".join(f"{k}={v}" for k, v in figures.items()))
    print(f"chaos details: {path}")
    return figures


def assert_nothing_lost(figures: dict[str, Any], workers: list[Worker]) -> None:
    problems = {k: figures[k] for k in ("lost", "unstored", "unreadable_outputs", "crash_lines")
                if figures[k]}
    assert figures["inputs_by_ref"] and figures["outputs_by_ref"], f"no claim check was exercised: {figures}"
    assert not problems, f"{problems}: {figures}\nworker log tail:\n{workers[-1].log()[-3000:]}"


@pytest.mark.timeout(420)
async def test_worker_killed_mid_stream_with_another_beside_it_loses_nothing(start_worker, settings, tmp_path):
    first = start_worker(claim_check_bytes=WORKER_CLAIM_CHECK_BYTES)
    second = start_worker(claim_check_bytes=WORKER_CLAIM_CHECK_BYTES)
    async with InferenceClient(client_settings(settings)) as client:
        await wait_ready(client, first)
        await wait_ready(client, second)
        stream = await steady_stream(client, at={DURATION_S / 3: first.kill})
        figures = await figures_of("worker-kill", settings, client, stream, [first, second], tmp_path)
    assert second.proc.poll() is None, second.log()[-3000:]
    assert_nothing_lost(figures, [first, second])


@pytest.fixture
def private_stack(request: pytest.FixtureRequest, tmp_path: Path,
                  model_repository: Path) -> Iterator[tuple[Settings, LocalStack]]:
    """A stack of this test's own: its S3 server or broker is killed, which the session's tests
    must not see. Indirect parameter: the broker storage ("memory" unless given)."""
    tag = uuid.uuid4().hex[:8]
    settings = isolated_settings(tmp_path / "stack", tag, model_repository=model_repository)
    settings = settings.model_copy(update={"broker_storage": getattr(request, "param", "memory")})
    stack = LocalStack(settings)
    try:
        stack.up()
        asyncio.run(bootstrap_registry(settings))
        yield settings, stack
    finally:
        stack.down()
        asyncio.run(drop_database(settings.postgres_dsn))


async def outage(stack: LocalStack, service: str, down_s: float, back: list[float] | None = None) -> None:
    """SIGKILL a stack service ("s3" or "kafka"), keep it down `down_s`, then start it on the same
    ports and data; appends the loop time at which it answers again to `back`."""
    pid = int((stack.state_dir / "pids" / f"{service}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    await wait_for(lambda: asyncio.to_thread(stack.status), timeout=15, interval=0.1,
                   until=lambda status: not status[service]["running"], what=f"{service} (pid {pid}) gone")
    await asyncio.sleep(max(0.0, killed + down_s - time.monotonic()))  # the outage lasts down_s
    await asyncio.to_thread(stack.up)  # returns once every service answers
    if back is not None:
        back.append(asyncio.get_running_loop().time())


@pytest.mark.timeout(420)
async def test_s3_server_killed_and_restarted_mid_stream_loses_nothing(private_stack, tmp_path):
    settings, stack = private_stack
    worker = Worker(settings, tmp_path / "worker.log", claim_check_bytes=WORKER_CLAIM_CHECK_BYTES).start()
    try:
        async with InferenceClient(client_settings(settings)) as client:
            await wait_ready(client, worker)
            stream = await steady_stream(client, at={DURATION_S / 3: lambda: outage(stack, "s3", S3_OUTAGE_S)})
            figures = await figures_of("s3-kill", settings, client, stream, [worker], tmp_path)
        assert worker.proc.poll() is None, worker.log()[-3000:]
    finally:
        worker.stop()
    assert_nothing_lost(figures, [worker])


def resume_figures(stream: Stream, back: float) -> dict[str, Any]:
    """How soon after the broker was back the workers answered: the first reply at all, the first
    reply to a request sent after that, and the longest any request waited for its reply counting
    from then (from its send, if later): the workers have caught up with what piled up during the
    outage once that wait is over."""
    def seconds(times: list[float], since: float) -> float | None:
        return round(min(times) - since, 2) if times else None

    after = [i for i, sent in enumerate(stream.sent_at) if sent >= back]
    waits = sorted(at - max(stream.sent_at[i], back) for i, at in stream.answered_at.items() if at >= back)
    return {
        "sent_after_restart": len(after),
        "first_reply_s": seconds([at for at in stream.answered_at.values() if at >= back], back),
        "resume_s": seconds([stream.answered_at[i] for i in after if i in stream.answered_at], back),
        "caught_up_s": round(waits[-1], 2) if waits else None,
        "wait_after_restart_p50_s": round(waits[len(waits) // 2], 2) if waits else None,
    }


@pytest.mark.timeout(480)
@pytest.mark.parametrize("private_stack", ["s3"], indirect=True)
async def test_broker_killed_and_restarted_mid_stream_workers_resume_and_lose_nothing(private_stack, tmp_path):
    settings, stack = private_stack
    assert stack.broker_storage == "s3"
    workers = [Worker(settings, tmp_path / f"worker-{n}.log", claim_check_bytes=WORKER_CLAIM_CHECK_BYTES).start()
               for n in range(2)]
    back: list[float] = []
    try:
        async with InferenceClient(client_settings(settings)) as client:
            for worker in workers:
                await wait_ready(client, worker)
            kill_broker = lambda: outage(stack, "kafka", BROKER_OUTAGE_S, back)  # noqa: E731
            stream = await steady_stream(client, at={DURATION_S / 3: kill_broker})
            figures = await figures_of("broker-kill", settings, client, stream, workers, tmp_path)
        for worker in workers:
            assert worker.proc.poll() is None, worker.log()[-3000:]
    finally:
        for worker in workers:
            worker.stop()
    resumed = resume_figures(stream, back[0])
    print("CHAOS broker-kill " + " ".join(f"{k}={v}" for k, v in resumed.items()))
    assert figures["not_acknowledged"] < figures["sent"] // 2, f"the broker took too few requests: {figures}"
    assert_nothing_lost(figures, workers)
    late = {k: resumed[k] for k in ("resume_s", "caught_up_s") if resumed[k] is None or resumed[k] > BROKER_RESUME_S}
    assert not late, (f"workers did not resume within {BROKER_RESUME_S} s of the broker being back: {resumed}\n"
                      f"worker log tail:\n{workers[0].log()[-3000:]}")
