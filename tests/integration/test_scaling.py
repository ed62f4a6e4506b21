"""Scaling by partitions on the real stack: workers join and die mid-stream and nothing is lost
or stored twice; SIGTERM drains; `inferstream lag` and its gauge; `worker --workers N`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from support.cli_process import cli_popen, run_cli
from support.metrics import scrape, summed
from support.presence import wait_until_live
from support.waiting import wait_for

from infra.local import ROOT
from infra.local.harness import settings_env, tiny_input, wait_ready
from infra.local.stack import free_port
from streams.client import InferenceClient, ReplyTimeout
from streams.storage.results import ResultsStore
from streams.telemetry.lag import read_lag
from topics.names import Topics

pytestmark = pytest.mark.integration


async def send_paced(client: InferenceClient, requests: list, rate: float,
                     at: dict[int, Callable[[], object]]) -> list[asyncio.Future]:
    """Send the requests at about `rate` per second; before request i, run `at[i]()`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    waiters = []
    for i, request in enumerate(requests):
        if i in at:
            at[i]()
        waiters.append(await client.send(request, tiny_input(seed=i)))
        if i % 50 == 49:
            await asyncio.sleep(max(0.0, start + (i + 1) / rate - loop.time()))
    return waiters


async def outcomes(client: InferenceClient, requests: list, waiters: list) -> tuple[list, int]:
    """(results, explicit timeouts) of every sync caller."""
    done = await asyncio.gather(*(client.wait(r, w) for r, w in zip(requests, waiters)), return_exceptions=True)
    unexpected = [d for d in done if isinstance(d, BaseException) and not isinstance(d, ReplyTimeout)]
    assert not unexpected, unexpected[:3]
    return [d for d in done if not isinstance(d, BaseException)], sum(isinstance(d, ReplyTimeout) for d in done)


async def stored(settings, request_ids: list[str], timeout: float = 120.0) -> int:
    """Result rows in PostgreSQL (one per request id) for these requests, once all are there or
    after `timeout`."""
    async with ResultsStore(settings.postgres_dsn) as results:
        return len(await results.wait_until_stored(request_ids, timeout_s=timeout))


@pytest.mark.timeout(600)
async def test_workers_join_and_die_mid_stream_and_every_request_is_answered_once(start_worker, settings):
    total = 10_000
    first, second = start_worker(), start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, first)
        await wait_ready(client, second)
        requests = [client.request("tiny", timeout=400) for _ in range(total)]
        # A third worker joins a fifth of the way in; the first is SIGKILLed past half-way.
        waiters = await send_paced(client, requests, rate=250,
                                   at={total // 5: start_worker, total * 11 // 20: first.kill})
        results, timed_out = await asyncio.wait_for(outcomes(client, requests, waiters), 450)
    print(f"answered {len(results)}, timed out {timed_out}")
    assert (len(results), timed_out) == (total, 0)
    assert all(r.header.status == "ok" for r in results)
    assert {r.header.request_id for r in results} == {r.request_id for r in requests}
    assert await stored(settings, [r.request_id for r in requests]) == total


@pytest.mark.timeout(300)
async def test_sigterm_mid_stream_drains_and_exits_cleanly(start_worker, settings):
    total = 3000
    leaving, staying = start_worker(), start_worker()
    stopped: list[asyncio.Future] = []

    def stop_leaving() -> None:
        stopped.append(asyncio.ensure_future(asyncio.to_thread(_timed_stop, leaving)))

    async with InferenceClient(settings) as client:
        await wait_ready(client, leaving)
        await wait_ready(client, staying)
        requests = [client.request("tiny", timeout=240) for _ in range(total)]
        waiters = await send_paced(client, requests, rate=200, at={total // 3: stop_leaving})
        seconds = await stopped[0]
        results, timed_out = await asyncio.wait_for(outcomes(client, requests, waiters), 240)
    assert leaving.proc.returncode == 0, leaving.log()[-3000:]
    assert seconds < 25
    assert (len(results), timed_out) == (total, 0)
    assert {r.header.request_id for r in results} == {r.request_id for r in requests}
    assert await stored(settings, [r.request_id for r in requests]) == total


# A worker whose sink step takes seconds (its work: the SIGTERM is sent once it has started, so
# that it lands inside one).
SLOW_SINK_WORKER = """
import asyncio
import sys

from streams.worker.sink import Sink

step = Sink.step


async def slow_step(self, messages, outbox):
    print("sink step started", flush=True)
    await asyncio.sleep(4)
    await step(self, messages, outbox)
    print("sink step finished", flush=True)


Sink.step = slow_step
sys.argv = ["inferstream", "worker"]
from streams.cli.app import main

main()
"""


@pytest.mark.timeout(300)
async def test_sigterm_inside_a_step_finishes_it_before_committing(start_worker, settings, tmp_path):
    """Faust cancels its agents on stop, and the cancelled batch would be acknowledged (and
    committed) unprocessed; the worker must wait for the step instead."""
    total = 20
    log_path = tmp_path / "slow.log"
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        slow = await asyncio.create_subprocess_exec(sys.executable, "-c", SLOW_SINK_WORKER, cwd=ROOT, env=env,
                                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async with InferenceClient(settings) as client:
            requests = [client.request("tiny", timeout=120) for _ in range(total)]
            waiters = [await client.send(r, tiny_input(seed=i)) for i, r in enumerate(requests)]
            await asyncio.wait_for(asyncio.gather(*waiters), 120)
        await wait_for(lambda: "sink step started" in log_path.read_text(), timeout=30, interval=0.1,
                       what="a sink step started")
        slow.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(slow.wait(), 30) == 0, log_path.read_text()[-3000:]
        assert "sink step finished" in log_path.read_text()
    finally:
        if slow.returncode is None:
            slow.kill()
    # Whatever the stopped worker committed, a new one stores the rest.
    start_worker()
    assert await stored(settings, [r.request_id for r in requests], timeout=60) == total


def _timed_stop(worker) -> float:
    started = time.monotonic()
    worker.stop(signal.SIGTERM, timeout=30)
    return time.monotonic() - started


async def lag_by_topic(settings) -> dict[str, int]:
    by_topic: dict[str, int] = {}
    for p in await read_lag(settings):
        by_topic[p.topic] = by_topic.get(p.topic, 0) + p.lag
    return by_topic


@pytest.mark.timeout(300)
async def test_lag_of_a_stopped_group_is_its_backlog_and_the_gauge_follows(start_worker, settings):
    backlog = 300
    topics = Topics(settings.topic_prefix)
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        worker.stop()  # commits on the way out
        before = await lag_by_topic(settings)
        for i in range(backlog):
            await client.send(client.request("tiny", timeout=300), tiny_input(seed=i), delivered=True)
        after = await lag_by_topic(settings)
        assert after[topics.requests] - before[topics.requests] == backlog
        assert after[topics.model("tiny")] == before[topics.model("tiny")] == 0
        assert after == await lag_by_topic(settings)  # reading it changed nothing

        out = (await run_cli("lag", settings=settings, env={"INFERSTREAM_SCALE_LAG_PER_WORKER": "100"},
                             timeout=60)).output
        total = sum(after.values())
        assert f"total lag: {total}" in out
        assert f"suggested workers: {min(4, -(-total // 100))}" in out

        # A worker serving the gauge drains the backlog, and the gauge shows it.
        port = free_port()
        exporter = start_worker(metrics_port=port)
        seen: list[dict[str, float]] = []  # the gauge summed by topic, empty until its first refresh

        async def lag_gauge() -> dict[str, float]:
            exporter.check_running()
            try:
                seen.append(summed(await scrape(f"http://127.0.0.1:{port}/metrics"), "inferstream_consumer_lag",
                                   by="topic"))
            except aiohttp.ClientError:  # not serving its metrics yet
                return {}
            return seen[-1]

        await wait_for(lag_gauge, timeout=120, interval=1, until=lambda lags: lags.get(topics.requests) == 0,
                       what="the gauge showing the backlog drained")
    assert any(s.get(topics.requests, 0) > 0 for s in seen), seen


@pytest.mark.timeout(120)
async def test_lag_is_exact_when_batches_hold_several_records(topics_ready):
    """The local broker answers ListOffsets(latest) below the end once a record batch holds several
    records: lag must come out exact anyway, never negative."""
    settings = topics_ready
    topic, group = Topics(settings.topic_prefix).requests, f"lag-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=200)
    await producer.start()
    try:
        async def batch(count: int) -> None:  # one linger: one record batch on partition 0
            sends = [await producer.send(topic, b"lag", partition=0) for _ in range(count)]
            await asyncio.gather(*sends)

        await batch(10)
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_end(tp)
            await consumer.getmany(tp, timeout_ms=1000)  # the fetch learns the real end
            end = consumer.highwater(tp)
            assert end is not None
            await consumer.commit({tp: end})
        finally:
            await consumer.stop()
        caught_up = {p.partition: p.lag for p in await read_lag(settings, group) if p.topic == topic}
        await batch(5)
        behind = {p.partition: p.lag for p in await read_lag(settings, group) if p.topic == topic}
    finally:
        await producer.stop()
    assert caught_up[0] == 0 and behind[0] == 5, (caught_up, behind)
    assert all(lag >= 0 for lag in [*caught_up.values(), *behind.values()])


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.timeout(300)
async def test_workers_option_runs_a_group_restarts_a_dead_worker_and_stops_on_sigterm(topics_ready, tmp_path):
    settings = topics_ready

    def supervisor(**env: str) -> subprocess.Popen:
        return cli_popen("worker", "--workers", "2", settings=settings, env=env,
                         stdout=open(tmp_path / "supervisor.log", "ab"), stderr=subprocess.STDOUT)

    async with InferenceClient(settings) as client:
        proc = supervisor()
        workers = await _two_children(proc)
        restarted: list[int] = []
        try:
            # A worker that dies on its own is started again; the survivor keeps running.
            os.kill(workers[0], signal.SIGKILL)
            restarted = await _two_children(proc, other_than=(workers[0],))
            assert workers[1] in restarted and proc.poll() is None
            # Stopped once both have started: a worker stopped halfway through faust's start can hang
            # until the supervisor kills it (its consumer thread still starting).
            await wait_until_live(settings, restarted)
            await asyncio.wait_for(client.infer("tiny", tiny_input(), timeout=90), 100)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 60) == 0
            assert not any(Path(f"/proc/{pid}").exists() for pid in restarted)
        finally:
            _kill(proc, workers + restarted)

        # A worker that dies more often than the restart limit stops the group with an error.
        looping = supervisor(INFERSTREAM_WORKER_RESTARTS_PER_MINUTE="1")
        workers = await _two_children(looping)
        again: list[int] = []
        try:
            os.kill(workers[0], signal.SIGKILL)
            again = await _two_children(looping, other_than=(workers[0],))
            os.kill(next(pid for pid in again if pid != workers[1]), signal.SIGKILL)
            assert await asyncio.to_thread(looping.wait, 60) == 1
            assert not any(Path(f"/proc/{pid}").exists() for pid in again)
        finally:
            _kill(looping, workers + again)
    log = (tmp_path / "supervisor.log").read_text(errors="replace")
    assert "restarting it in 1 s" in log and "it died too often, stopping all workers" in log


@pytest.mark.timeout(120)
async def test_workers_told_to_stop_while_starting_stop_cleanly(topics_ready, tmp_path):
    """SIGTERM right after the supervisor spawned its workers: they are still importing, with no
    handler yet, and die of the signal; the supervisor still reports a clean stop."""
    proc = cli_popen("worker", "--workers", "2", settings=topics_ready,
                     stdout=open(tmp_path / "supervisor.log", "ab"), stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        workers = await _two_children(proc)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0, (tmp_path / "supervisor.log").read_text()
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        _kill(proc, workers)


async def _two_children(proc: subprocess.Popen, other_than: tuple[int, ...] = ()) -> list[int]:
    """The supervisor's two worker pids once it has two, none of them in `other_than`."""
    return await wait_for(lambda: _children(proc.pid), timeout=30, interval=0.2,
                          until=lambda children: len(children) == 2 and not set(children) & set(other_than),
                          what=f"supervisor {proc.pid} with two new children")


def _kill(proc: subprocess.Popen, children: list[int]) -> None:
    """Cleanup after a failed assertion: nothing of this test outlives it."""
    for pid in [proc.pid, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
