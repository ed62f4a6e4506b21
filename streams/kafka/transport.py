"""Faust's aiokafka transport with the project's fetch waits (`streams.kafka.fetch_wait`).

Faust fixes the consumer's `fetch_max_wait_ms` at 1500. Brokers that hold a fetch until the
wait expires when little data is there (Tansu does) then add up to that much latency per hop.
Here the worker's consumer fetches with `fetch_max_wait_ms` while records flow, longer while it
is behind, and, given an idle policy, slowly once idle: in `wake` mode it also follows the
deployment's wake channel in Redis, so that a client sending after a quiet spell is answered
without waiting for the next idle poll. Registered as the `inferstream-kafka://` broker scheme.
"""

from __future__ import annotations

from typing import ClassVar

import aiokafka
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver

from streams.kafka.fetch_wait import FetchWait, IdlePolicy, follow_wakes

SCHEME = "inferstream-kafka"


class ConsumerThread(driver.AIOKafkaConsumerThread):
    fetch_wait: FetchWait | None = None

    def _create_worker_consumer(self, transport: driver.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = Transport.fetch_max_wait_ms  # read when the consumer starts
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        idle = Transport.idle
        self.fetch_wait = FetchWait(self._ensure_consumer(), idle=idle)
        if idle is not None and idle.mode == "wake" and Transport.wake_from is not None:
            redis_url, channel = Transport.wake_from
            self.add_future(follow_wakes(redis_url, channel, self.fetch_wait.wake))  # cancelled on stop


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = Consumer
    fetch_max_wait_ms: ClassVar[int] = 100
    idle: ClassVar[IdlePolicy | None] = None
    wake_from: ClassVar[tuple[str, str] | None] = None  # (Redis URL, channel)


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"


def broker_url(bootstrap: str, fetch_max_wait_ms: int, idle: IdlePolicy | None = None,
               wake_from: tuple[str, str] | None = None) -> str:
    """The app's broker URL; the worker's consumer then fetches with `fetch_max_wait_ms` while
    records flow, with `idle` once idle, and follows wakes on `wake_from` (Redis URL, channel)."""
    Transport.fetch_max_wait_ms = fetch_max_wait_ms
    Transport.idle, Transport.wake_from = idle, wake_from
    return ";".join(f"{SCHEME}://{host.strip()}" for host in bootstrap.split(",") if host.strip())
