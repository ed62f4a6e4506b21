"""The work of each agent, free of Faust: the agents hand over consumed messages and an outbox;
these functions decode, validate, route, infer and emit.

Delivery is at-least-once: an agent acknowledges its messages only after the outbox has been
flushed (every send confirmed by the broker), so a crash redelivers instead of losing. Effects
are idempotent: results are upserted by request id, S3 keys derive from the request id.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from streams.batcher import AdaptiveBatcher
from streams.objectstore import ObjectStore
from streams.onnx_backend import OnnxModel
from streams.registry import ModelInfo, ModelRegistry
from streams.results_store import ResultsStore, StoredResult
from streams.routing import Router, check_deadline, check_inputs
from streams.settings import Settings
from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import (
    DeadLetter,
    ErrorInfo,
    InferenceRequest,
    InferenceResult,
    Status,
)
from topics.names import Topics, valid_topic

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
Send = Callable[[str, bytes | None, bytes, Headers | None], Awaitable[Awaitable[object]]]


@dataclass
class Message:
    """A consumed Kafka record."""

    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int
    headers: Headers = field(default_factory=list)


class Outbox:
    """Collects produce futures; `flush` waits until the broker confirmed every send."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._pending: list[Awaitable[object]] = []

    async def put(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> None:
        self._pending.append(await self._send(topic, key, value, headers))

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)


@dataclass
class Outcome:
    """What the backend produced for one request."""

    outputs: dict[str, np.ndarray]
    inference_ms: float
    batch_size: int


class Pipeline:
    def __init__(self, settings: Settings, registry: ModelRegistry, serve: list[str]) -> None:
        self.settings = settings
        self.topics = Topics(settings)
        self.registry = registry
        self.router = Router(registry, self.topics)
        self.serve = serve  # models whose inference agents run in this worker
        self.store = ObjectStore(settings)
        self.results = ResultsStore(settings.postgres_dsn)
        # Models load now, so that a broken artifact stops the worker at startup.
        self._models = {
            (name, version): OnnxModel(registry.resolve(name, version), settings.onnx_intra_op_threads)
            for name in serve
            for version in registry.versions(name)
        }
        self._batchers: dict[tuple[str, str], AdaptiveBatcher] = {}
        self._started = False
        self._start_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Idempotent: every agent awaits it before its first message."""
        async with self._start_lock:
            if self._started:
                return
            await asyncio.to_thread(self.store.ensure_bucket)
            await self.results.start()
            for key, model in self._models.items():
                batcher = AdaptiveBatcher(
                    _timed(model),
                    max_batch_size=min(self.settings.max_batch_size, model.info.max_batch_size),
                    max_delay=self.settings.max_batch_delay_ms / 1000,
                    max_pending=self.settings.max_inflight,
                    name=f"{key[0]}-v{key[1]}",
                )
                await batcher.start()
                self._batchers[key] = batcher
            self._started = True

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()
        self._batchers.clear()
        await self.results.stop()
        self._started = False

    # -- intake ------------------------------------------------------------------------------

    async def intake(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Validate and route each request to its model's topic, unchanged."""
        now = events.now_ms()
        for msg in messages:
            request: InferenceRequest | None = None
            try:
                self._check_size(msg)
                decoded = events.decode_request(msg.value)
                request = decoded.header
                route = self.router.route(request, now)
                if decoded.tensors:
                    check_inputs(route.model, decoded.tensors)
                key = msg.key or request.request_id.encode()
                await outbox.put(route.topic, key, msg.value, msg.headers)
            except EventError as error:
                await self.reject(outbox, msg, error, request)
        await outbox.flush()

    def _check_size(self, msg: Message) -> None:
        if len(msg.value) > self.settings.max_message_bytes:
            raise EventError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"{len(msg.value)} bytes is over {self.settings.max_message_bytes}; send large"
                " tensors by S3 reference (inputs_ref)",
            )

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Run every valid request through its model's micro-batcher, then reply."""
        started = events.now_ms()
        accepted: list[tuple[Message, InferenceRequest, ModelInfo, Awaitable[Outcome]]] = []
        for msg in messages:
            request: InferenceRequest | None = None
            try:
                decoded = events.decode_request(msg.value)
                request = decoded.header
                check_deadline(request, started)
                info = self.registry.resolve(request.model, request.version)
                tensors = decoded.tensors
                if request.inputs_ref:
                    _, tensors = events.decode_bundle(await self.store.aget(request.inputs_ref))
                check_inputs(info, tensors)
                batcher = self._batchers[(info.name, info.version)]
                accepted.append((msg, request, info, asyncio.ensure_future(batcher.submit(tensors))))
            except EventError as error:
                await self.reject(outbox, msg, error, request)
        for msg, request, info, pending in accepted:
            try:
                outcome = await pending
            except EventError as error:
                await self.reject(outbox, msg, error, request)
                continue
            except Exception as error:  # noqa: BLE001 - one bad batch must not stop the agent
                log.exception("inference failed for %s", request.request_id)
                await self.reject(outbox, msg, EventError(ErrorCode.INFERENCE_FAILED, str(error)), request)
                continue
            await self._reply_ok(outbox, request, info, outcome, started)
        await outbox.flush()

    async def _reply_ok(
        self, outbox: Outbox, request: InferenceRequest, info: ModelInfo, outcome: Outcome, started: int
    ) -> None:
        result = InferenceResult(
            request_id=request.request_id,
            correlation_id=request.correlation_id,
            model=info.name,
            model_version=info.version,
            status=Status.OK,
            batch_size=outcome.batch_size,
            tenant=request.tenant,
            batch_id=request.batch_id,
            created_ms=request.created_ms,
        )
        outputs = outcome.outputs
        bundle = events.encode_bundle(outputs)
        if len(bundle) > self.settings.claim_check_bytes:
            # Claim check: the object key is the request id, so a redelivery rewrites it.
            result.outputs_ref = await self.store.aput(f"results/{info.name}/{request.request_id}.bin", bundle)
            outputs = {}
        result.timings_ms = {
            "queue": max(0.0, started - request.created_ms),
            "inference": round(outcome.inference_ms, 3),
            "total": max(0.0, events.now_ms() - request.created_ms),
        }
        await self._emit_result(outbox, result, outputs, request.reply_to)

    # -- results -----------------------------------------------------------------------------

    async def _emit_result(
        self, outbox: Outbox, result: InferenceResult, outputs: dict[str, np.ndarray] | None,
        reply_to: str | None,
    ) -> None:
        value = events.encode_result(result, outputs)
        key = result.request_id.encode()
        headers = [("request_id", key)]
        if result.correlation_id:
            headers.append(("correlation_id", result.correlation_id.encode()))
        # An invalid reply_to was already rejected; its error goes to the default replies topic.
        reply_topic = reply_to if reply_to and valid_topic(reply_to) else self.topics.replies
        reply_key = (result.correlation_id or result.request_id).encode()
        await outbox.put(reply_topic, reply_key, value, headers)
        await outbox.put(self.topics.results, key, value, headers)

    async def reject(
        self, outbox: Outbox, msg: Message, error: EventError, request: InferenceRequest | None
    ) -> None:
        """Dead-letter the event with its reason and, where the caller is known, reply with the error."""
        request_id, reply_to, correlation_id = (
            (request.request_id, request.reply_to, request.correlation_id)
            if request else events.reply_address(msg.value)
        )
        log.info("rejected %s from %s[%d]@%d: %s", request_id, msg.topic, msg.partition, msg.offset, error)
        letter = DeadLetter(
            reason=error.code, message=error.message, source_topic=msg.topic,
            source_partition=msg.partition, source_offset=msg.offset, request_id=request_id,
            original_b64=base64.b64encode(msg.value).decode(),
        )
        await outbox.put(self.topics.deadletter, msg.key, events.encode_dead_letter(letter), msg.headers)
        if request_id is None:
            return
        result = InferenceResult(
            request_id=request_id, correlation_id=correlation_id,
            model=request.model if request else None, status=Status.ERROR,
            error=ErrorInfo(code=error.code, message=error.message),
            tenant=request.tenant if request else None,
            batch_id=request.batch_id if request else None,
            created_ms=request.created_ms if request else None,
        )
        await self._emit_result(outbox, result, None, reply_to)

    # -- sink --------------------------------------------------------------------------------

    async def sink(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Upsert a batch of results into PostgreSQL."""
        rows: list[StoredResult] = []
        for msg in messages:
            try:
                decoded = events.decode_result(msg.value)
            except EventError as error:
                await self.reject(outbox, msg, error, None)
                continue
            outputs = events.encode_bundle(decoded.tensors) if decoded.tensors else None
            rows.append(StoredResult(decoded.header, outputs, msg.partition, msg.offset))
        if rows:
            await self.results.upsert(rows)
        await outbox.flush()


def _timed(model: OnnxModel) -> Callable[[list], list]:
    """Wrap the backend so each outcome records the batch's inference time and size."""

    def run(batch: list) -> list:
        t0 = time.perf_counter()
        results = model.run_batch(batch)
        elapsed = (time.perf_counter() - t0) * 1000
        return [r if isinstance(r, BaseException) else Outcome(r, elapsed, len(batch)) for r in results]

    return run
