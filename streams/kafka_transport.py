"""Faust's aiokafka transport with a configurable fetch wait.

Faust fixes the consumer's `fetch_max_wait_ms` at 1500. Brokers that hold a fetch until the
wait expires when little data is there (Tansu does) then add up to that much latency per hop;
Apache Kafka answers as soon as data arrives, so a shorter wait only costs a few more empty
fetches while idle. A consumer that is behind fetches with a longer wait (`streams.fetch_wait`).
Registered as the `inferstream-kafka://` broker scheme.
"""

from __future__ import annotations

from typing import ClassVar

import aiokafka
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver

from streams.fetch_wait import wait_longer_when_behind

SCHEME = "inferstream-kafka"


class ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: driver.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = Transport.fetch_max_wait_ms  # read when the consumer starts
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        wait_longer_when_behind(self._ensure_consumer())


class Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = Consumer
    fetch_max_wait_ms: ClassVar[int] = 100


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"


def broker_url(bootstrap: str, fetch_max_wait_ms: int) -> str:
    Transport.fetch_max_wait_ms = fetch_max_wait_ms
    return ";".join(f"{SCHEME}://{host.strip()}" for host in bootstrap.split(",") if host.strip())
