"""Consumer lag per group and partition, the worker count it suggests, and a Prometheus gauge of
it (what KEDA scales on)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.core import GaugeMetricFamily

from streams.kafka.offsets import fixed_ends
from streams.lifecycle import Service
from streams.settings import Settings
from streams.telemetry import metrics
from topics.names import Topics

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

LAG_REFRESH_S = 5.0
# The lag reader's fetch wait: `fixed_ends` reads high watermarks from one fetch within its 1 s
# `getmany`, so the broker must answer an empty fetch well within that.
LAG_FETCH_WAIT_MS = 500


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
    topics = Topics(settings.topic_prefix)
    models = sorted(t for t in existing if t.startswith(topics.model("")))
    return [topics.requests, *models, topics.results]


class LagReader(Service):
    """Reads a group's committed offsets through a consumer that carries the group's id but never
    subscribes: it does not join the group, so the live members are not rebalanced, and with
    auto-commit off it commits nothing. Between reads its partitions are paused: it fetches
    nothing until the next read."""

    def __init__(self, settings: Settings, group: str | None = None) -> None:
        self.settings = settings
        self.group = group or settings.app_id
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        if self._consumer is not None:
            return
        # Created here: aiokafka binds a consumer to the running loop.
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, group_id=self.group,
            enable_auto_commit=False, request_timeout_ms=15000, fetch_max_wait_ms=LAG_FETCH_WAIT_MS,
        )
        await self._consumer.start()

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

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
    async with LagReader(settings, group) as reader:
        return await reader.read()


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
