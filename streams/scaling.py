"""Scaling by partitions: consumer lag per group and partition, the worker count it suggests, a
Prometheus gauge of it (what KEDA scales on), and `worker --workers N` process supervision."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.core import GaugeMetricFamily

from streams import metrics
from streams.replay import fixed_ends
from streams.settings import Settings
from topics.names import Topics

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

LAG_REFRESH_S = 5.0
# The lag reader's fetch wait: `fixed_ends` reads high watermarks from one fetch within its 1 s
# `getmany`, so the broker must answer an empty fetch well within that.
LAG_FETCH_WAIT_MS = 500
STOP_TIMEOUT_S = 30.0
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int  # where the group resumes: its commit, else the earliest offset
    end: int

    @property
    def lag(self) -> int:
        # A commit is never past the end: where a stale end says otherwise, nothing is behind.
        return max(0, self.end - self.committed)


def lag_topics(settings: Settings, existing: Iterable[str]) -> list[str]:
    """The topics the workers' group consumes: requests, every model topic, results."""
    topics = Topics(settings)
    models = sorted(t for t in existing if t.startswith(topics.model("")))
    return [topics.requests, *models, topics.results]


class LagReader:
    """Reads a group's committed offsets through a consumer that carries the group's id but never
    subscribes: it does not join the group, so the live members are not rebalanced, and with
    auto-commit off it commits nothing. Between reads its partitions are paused: it fetches
    nothing until the next read."""

    def __init__(self, settings: Settings, group: str | None = None) -> None:
        self.settings = settings
        self.group = group or settings.app_id
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        # Created here: aiokafka binds a consumer to the running loop.
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, group_id=self.group,
            enable_auto_commit=False, request_timeout_ms=15000, fetch_max_wait_ms=LAG_FETCH_WAIT_MS,
        )
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def read(self) -> list[PartitionLag]:
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError("LagReader.start() was not awaited")
        existing = await consumer.topics()
        tps = [
            TopicPartition(topic, p)
            for topic in lag_topics(self.settings, existing) if topic in existing
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        # Earliest, not 0, where nothing was committed: retention may have removed the start.
        start = await consumer.beginning_offsets(tps)
        end = await fixed_ends(consumer, tps)  # the listed end can lag behind (see fixed_ends)
        consumer.pause(*tps)  # fixed_ends left them assigned: no fetches until the next read
        committed = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        return [
            PartitionLag(self.group, tp.topic, tp.partition,
                         c if c is not None else start[tp], end[tp])
            for tp, c in zip(tps, committed)
        ]


async def read_lag(settings: Settings, group: str | None = None) -> list[PartitionLag]:
    reader = LagReader(settings, group)
    await reader.start()
    try:
        return await reader.read()
    finally:
        await reader.stop()


def suggested_workers(lags: list[PartitionLag], lag_per_worker: int) -> int:
    """Workers to drain the backlog: one per `lag_per_worker` events of total lag, at least one,
    and no more than the widest topic's partitions (a worker beyond that gets none)."""
    total = sum(p.lag for p in lags)
    most_partitions = max(Counter(p.topic for p in lags).values(), default=1)
    return max(1, min(most_partitions, math.ceil(total / max(1, lag_per_worker))))


# -- Prometheus ---------------------------------------------------------------------------------


class LagCollector:
    """`inferstream_consumer_lag{topic,partition,group}` from the last refresh: a scrape never
    waits on the broker."""

    def __init__(self) -> None:
        self.lags: list[PartitionLag] = []

    def collect(self):
        gauge = GaugeMetricFamily("inferstream_consumer_lag", "Events not yet committed by the consumer group",
                                  labels=["topic", "partition", "group"])
        for p in self.lags:
            gauge.add_metric([p.topic, str(p.partition), p.group], p.lag)
        yield gauge


def export_lag(app: faust.App, settings: Settings) -> None:
    """Add the lag gauge to the worker's metrics, refreshed by a task of its Faust app."""
    collector = LagCollector()
    metrics.REGISTRY.register(collector)
    reader = LagReader(settings)

    @app.task
    async def refresh_lag() -> None:
        await reader.start()
        try:
            while True:
                try:
                    collector.lags = await reader.read()
                except Exception as exc:  # noqa: BLE001 - metrics must never stop the worker
                    log.warning("consumer lag not refreshed: %r", exc)
                await asyncio.sleep(LAG_REFRESH_S)
        finally:
            await reader.stop()


# -- several worker processes ------------------------------------------------------------------


class RestartPolicy:
    """When a worker that died on its own starts again: after a delay that doubles with each death
    in the last `window_s` (from `first_delay_s` up to `max_delay_s`), and not at all once it died
    more than `limit` times in that window (a crash loop a restart will not mend)."""

    def __init__(self, limit: int = 5, first_delay_s: float = 1.0, max_delay_s: float = 30.0,
                 window_s: float = 60.0) -> None:
        self.limit, self.first_delay_s, self.max_delay_s, self.window_s = limit, first_delay_s, max_delay_s, window_s
        self._deaths: deque[float] = deque()

    def delay_after_death(self, now: float) -> float | None:
        """Seconds to wait before restarting a worker that died at `now`; None: do not restart."""
        self._deaths.append(now)
        while self._deaths[0] <= now - self.window_s:
            self._deaths.popleft()
        if len(self._deaths) > self.limit:
            return None
        return min(self.max_delay_s, self.first_delay_s * 2 ** (len(self._deaths) - 1))


@dataclass
class _Slot:
    """One of the N worker places: its process, and when it starts again after a death."""

    index: int
    policy: RestartPolicy
    child: subprocess.Popen | None = None
    restart_at: float | None = None


def run_workers(count: int, metrics_port: int = 0, restarts_per_minute: int = 5) -> int:
    """Run `count` worker processes in one consumer group until SIGINT/SIGTERM, which is passed
    on to each. A worker that dies on its own is started again (RestartPolicy); one that dies more
    than `restarts_per_minute` times in a minute stops them all. Returns 0 after a clean stop, 1
    after a crash loop or when a worker failed to stop."""
    slots = [_Slot(i, RestartPolicy(limit=restarts_per_minute), restart_at=0.0) for i in range(count)]
    stopping: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        for slot in slots:
            if slot.child is not None and slot.child.poll() is None:
                os.kill(slot.child.pid, signum)

    for signum in _STOP_SIGNALS:
        signal.signal(signum, forward)
    crash_loop = False
    while not stopping and not crash_loop:
        now = time.monotonic()
        for slot in slots:
            if slot.child is not None and slot.child.poll() is not None:
                delay = slot.policy.delay_after_death(now)
                print(f"worker {slot.index} (pid {slot.child.pid}) exited with {slot.child.returncode}; "
                      + ("it died too often, stopping all workers" if delay is None
                         else f"restarting it in {delay:.0f} s"), file=sys.stderr, flush=True)
                slot.child = None
                if delay is None:
                    crash_loop = True
                    break
                slot.restart_at = now + delay
            if slot.child is None and slot.restart_at is not None and now >= slot.restart_at:
                # Signals wait until the new child is in its slot, so that `forward` reaches it
                # (the first start of each worker happens here too).
                signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
                try:
                    if not stopping:
                        slot.child, slot.restart_at = _spawn_worker(slot.index, metrics_port), None
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        time.sleep(0.2)
    codes = [_stop(slot.child, signal_it=not stopping) for slot in slots if slot.child is not None]
    return 0 if not crash_loop and all(code == 0 for code in codes) else 1


def _spawn_worker(index: int, metrics_port: int) -> subprocess.Popen:
    env = dict(os.environ)
    if metrics_port > 0:
        env["INFERSTREAM_METRICS_PORT"] = str(metrics_port + index)  # one /metrics per process
    # The lag is the group's, not a worker's: one exporter is enough (and sums stay right).
    if index > 0:
        env["INFERSTREAM_METRICS_LAG"] = "false"
    # Own session: a terminal's Ctrl-C reaches the supervisor only, which forwards it once.
    # The child inherits the signal mask `run_workers` holds while it spawns: it unblocks it.
    return subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env, start_new_session=True,
                            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS))


def _stop(child: subprocess.Popen, signal_it: bool) -> int:
    """SIGTERM (unless the signal was already forwarded), a bounded wait, then SIGKILL; the exit
    code."""
    if signal_it and child.poll() is None:
        os.kill(child.pid, signal.SIGTERM)
    try:
        return child.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        return -signal.SIGKILL
