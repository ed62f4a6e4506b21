"""A Kafka client for inferstream: produce request events and await their results on a reply
topic, correlated by id (one future per request). Used by the HTTP bridge, the CLI, the tests and
the benchmarks.

Each client reads its reply topic's partitions by assignment, not through a consumer group, so
a rebalance can never move its replies to another process; a bridge instance gives each client
a reply topic of its own. A reply finds its waiting future by correlation id in a dict: O(1)
per reply, however many requests are pending.

Fetch waits (`streams.kafka.fetch_wait`): the reply consumer fetches with the short wait while replies
are expected and polls slowly once idle; each send wakes it, and, after a quiet spell, wakes the
workers through Redis (`kafka_idle_mode=wake`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from streams.kafka.fetch_wait import FetchWait, IdlePolicy, WakePublisher
from streams.lifecycle import Service
from streams.settings import Settings
from streams.storage.objects import ObjectStore
from topics import events
from topics.events import InferenceRequest, Result
from topics.names import Topics

_EXPIRED_MEMORY = 100_000  # correlation ids remembered after a timeout, to count late replies


class UpstreamUnavailable(RuntimeError):
    """The broker did not take the request in time."""


class ReplyTimeout(TimeoutError):
    """No reply before the request's deadline."""


class InferenceClient(Service):
    def __init__(self, settings: Settings, reply_topic: str | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.reply_topic = reply_topic or self.topics.replies
        self.store = ObjectStore(settings)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, linger_ms=5, acks="all",
            max_request_size=settings.max_message_bytes + 64 * 1024,
            request_timeout_ms=int(settings.produce_timeout_s * 1000),
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        )
        self._fetch_wait: FetchWait | None = None
        self._wakes = WakePublisher(settings)
        self._waiters: dict[str, asyncio.Future[Result]] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._reader: asyncio.Task[None] | None = None
        self.late_replies = 0  # replies that came after their caller gave up
        self.foreign_replies = 0  # replies for no request of this client

    async def start(self) -> None:
        if self._reader is not None:
            return
        await self._producer.start()
        await self._consumer.start()
        # Short waits while replies are expected, a longer one to catch up on a burst of them,
        # slow polls once idle.
        self._fetch_wait = FetchWait(self._consumer, idle=IdlePolicy.from_settings(self.settings))
        partitions = self._consumer.partitions_for_topic(self.reply_topic)
        if not partitions:
            await self._consumer._client.force_metadata_update()  # topic created just now
            partitions = self._consumer.partitions_for_topic(self.reply_topic) or set()
        if not partitions:
            raise RuntimeError(f"reply topic {self.reply_topic!r} does not exist")
        assigned = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        # Only replies produced from now on: position each partition at its end before sending.
        self._consumer.assign(assigned)
        await self._consumer.seek_to_end(*assigned)
        for tp in assigned:
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read_replies())

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await self._producer.stop()
        await self._consumer.stop()
        await self._wakes.close()
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()

    @property
    def pending(self) -> int:
        """Requests still waiting for a reply."""
        return len(self._waiters)

    async def _read_replies(self) -> None:
        while True:
            # The timeout only bounds the wait for fetched records: they wake it when they come.
            batches = await self._consumer.getmany(timeout_ms=1000, max_records=2000)
            for records in batches.values():
                for record in records:
                    self._deliver((record.key or b"").decode(), record.value)

    def _deliver(self, correlation: str, value: bytes) -> None:
        waiter = self._waiters.pop(correlation, None)
        if waiter is None:
            if correlation in self._expired:
                self.late_replies += 1
            else:
                self.foreign_replies += 1  # includes duplicates of an at-least-once redelivery
            return
        if waiter.done():
            return
        try:
            waiter.set_result(events.decode_result(value))
        except events.EventError as exc:
            waiter.set_exception(exc)

    def request(self, model: str, *, version: str | None = None, timeout: float = 30.0,
                **fields: Any) -> InferenceRequest:
        """A request event for `model` that replies to this client, due within `timeout` seconds;
        `send` carries it with its tensors."""
        return InferenceRequest(
            request_id=events.new_request_id(), model=model, version=version,
            reply_to=self.reply_topic, correlation_id=uuid.uuid4().hex,
            deadline_ms=events.now_ms() + int(timeout * 1000), **fields,
        )

    async def send(
        self, request: InferenceRequest, inputs: dict[str, np.ndarray], *, delivered: bool = False,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Result]:
        """Produce one request; the returned future resolves with its result (when it has a
        correlation id and replies to this client's topic). `delivered`: return only once the
        broker has confirmed the event. `headers`: Kafka headers, e.g. the trace context."""
        if sum(a.nbytes for a in inputs.values()) > self.settings.claim_check_bytes:
            request.inputs_ref = await self.store.aput(
                f"requests/{request.request_id}.bin", events.encode_bundle(inputs)
            )
            inputs = {}
        waiter: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        if request.correlation_id:
            self._waiters[request.correlation_id] = waiter
            if self._fetch_wait is not None:
                self._fetch_wait.wake()  # its reply is expected: no idle poll between
        try:
            delivery = await self.produce(
                self.topics.requests, request.request_id.encode(), events.encode_request(request, inputs),
                delivered=delivered, headers=headers,
            )
        except UpstreamUnavailable:
            self._waiters.pop(request.correlation_id or "", None)
            raise
        # A send that fails later (the broker went away) fails the waiter now, not at the deadline.
        delivery.add_done_callback(lambda sent: self._on_delivery(request, waiter, sent))
        return waiter

    def _on_delivery(self, request: InferenceRequest, waiter: asyncio.Future, sent: asyncio.Future) -> None:
        if sent.cancelled() or sent.exception() is None or waiter.done():
            return
        self._waiters.pop(request.correlation_id or "", None)
        waiter.set_exception(UpstreamUnavailable(f"the broker did not accept the request: {sent.exception()!r}"))

    async def produce(self, topic: str, key: bytes, value: bytes, *, delivered: bool = True,
                      headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future:
        """Bounded in time: with the broker down, aiokafka would otherwise wait for metadata.
        Returns the delivery future (already resolved when `delivered`)."""
        self._wakes.sending()  # idle workers fetch now, not at their next idle poll
        try:
            async with asyncio.timeout(self.settings.produce_timeout_s):  # no extra task per send
                delivery = await self._producer.send(topic, value, key=key, headers=headers)
                if delivered:
                    await asyncio.shield(delivery)
        except (TimeoutError, KafkaError) as exc:
            raise UpstreamUnavailable(f"the broker did not accept the event: {exc!r}") from None
        return delivery

    async def broker_ready(self) -> bool:
        """A fresh metadata round trip: cached metadata would hide a broker that went away."""
        try:
            return bool(await asyncio.wait_for(self._producer.client.force_metadata_update(), 2.0))
        except (TimeoutError, KafkaError):
            return False

    async def wait(self, request: InferenceRequest, waiter: asyncio.Future[Result]) -> Result:
        """The reply, or ReplyTimeout at the request's deadline (the waiter is dropped then)."""
        remaining = (request.deadline_ms - events.now_ms()) / 1000 if request.deadline_ms else None
        try:
            return await asyncio.wait_for(waiter, remaining)
        except TimeoutError:
            self._forget(request.correlation_id)
            raise ReplyTimeout(f"no reply for request {request.request_id} before its deadline") from None
        except asyncio.CancelledError:
            self._forget(request.correlation_id)  # the caller went away
            raise

    def _forget(self, correlation: str | None) -> None:
        if correlation and self._waiters.pop(correlation, None) is not None:
            self._expired[correlation] = None
            if len(self._expired) > _EXPIRED_MEMORY:
                self._expired.popitem(last=False)

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
        timeout: float = 30.0, **fields: Any,
    ) -> Result:
        request = self.request(model, version=version, timeout=timeout, **fields)
        return await self.wait(request, await self.send(request, inputs))

    async def outputs(self, result: Result) -> dict[str, np.ndarray]:
        """The result's tensors: inline ones as they are (no thread hop), those that came by
        reference fetched from S3 and decoded off the event loop."""
        if result.header.outputs_ref:
            bundle = await self.store.aget(result.header.outputs_ref)
            _, tensors = await asyncio.to_thread(events.decode_bundle, bundle)
            return tensors
        return result.tensors
