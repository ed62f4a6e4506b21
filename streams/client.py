"""A Kafka client for inferstream: produce request events and await their results on a reply
topic, correlated by id (one future per request). Used by the CLI, the tests and benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.objectstore import ObjectStore
from streams.settings import Settings
from topics import events
from topics.events import InferenceRequest, Result
from topics.names import Topics


class InferenceClient:
    def __init__(self, settings: Settings, reply_topic: str | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings)
        self.reply_topic = reply_topic or self.topics.replies
        self.store = ObjectStore(settings)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, linger_ms=5, acks="all",
            max_request_size=settings.max_message_bytes + 64 * 1024,
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
            fetch_max_wait_ms=50,
        )
        self._waiters: dict[str, asyncio.Future[Result]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
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
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._producer.stop()
        await self._consumer.stop()
        for waiter in self._waiters.values():
            waiter.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> InferenceClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _read_replies(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batches.values():
                for record in records:
                    correlation = (record.key or b"").decode()
                    waiter = self._waiters.pop(correlation, None)
                    if waiter is None or waiter.done():
                        continue  # another client's reply, or one we stopped waiting for
                    try:
                        waiter.set_result(events.decode_result(record.value))
                    except events.EventError as exc:
                        waiter.set_exception(exc)

    def request(
        self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
        timeout: float = 30.0, parameters: dict | None = None, tenant: str | None = None,
    ) -> InferenceRequest:
        return InferenceRequest(
            request_id=events.new_request_id(), model=model, version=version,
            reply_to=self.reply_topic, correlation_id=uuid.uuid4().hex,
            deadline_ms=events.now_ms() + int(timeout * 1000), parameters=parameters or {},
            tenant=tenant,
        )

    async def send(self, request: InferenceRequest, inputs: dict[str, np.ndarray]) -> asyncio.Future[Result]:
        """Produce one request; the returned future resolves with its result."""
        bundle_size = sum(a.nbytes for a in inputs.values())
        if bundle_size > self.settings.claim_check_bytes:
            request.inputs_ref = await self.store.aput(
                f"requests/{request.request_id}.bin", events.encode_bundle(inputs)
            )
            inputs = {}
        waiter: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiters[request.correlation_id] = waiter
        await self._producer.send(
            self.topics.requests, events.encode_request(request, inputs),
            key=request.request_id.encode(),
        )
        return waiter

    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], *, version: str | None = None,
        timeout: float = 30.0, parameters: dict | None = None,
    ) -> Result:
        request = self.request(model, inputs, version=version, timeout=timeout, parameters=parameters)
        waiter = await self.send(request, inputs)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            self._waiters.pop(request.correlation_id, None)
            raise TimeoutError(f"no reply for request {request.request_id} within {timeout} s") from None

    def outputs(self, result: Result) -> dict[str, np.ndarray]:
        """The result's tensors, fetched from S3 when they came by reference."""
        if result.header.outputs_ref:
            _, tensors = events.decode_bundle(self.store.get(result.header.outputs_ref))
            return tensors
        return result.tensors
