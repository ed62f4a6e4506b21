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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.trace import Span

from streams import tracing
from streams.auth import Principal
from streams.gatekeeper import Gatekeeper
from streams.logs import log_request
from streams.metrics import DEAD_LETTERS, ERRORS, LATENCY, REQUESTS
from streams.objectstore import ObjectStore
from streams.registry import ModelInfo, ModelRegistry
from streams.registry_store import RegistryFollower, fetch_artifact
from streams.results_store import ResultsStore, StoredResult
from streams.routing import Router, check_deadline, check_inputs
from streams.serving import Outcome, VersionServer
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
    timestamp_ms: int | None = None  # when it was produced


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


VERSION_HEADER = "inferstream-version"  # the version the intake routed a request to
TENANT_HEADER = "inferstream-tenant"  # the tenant the auth stage established


class Pipeline:
    def __init__(self, settings: Settings, registry: ModelRegistry, serve: list[str],
                 gatekeeper: Gatekeeper | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings)
        self.registry = registry
        self.router = Router(registry, self.topics)
        self.serve = serve  # models whose inference agents run in this worker
        self.gatekeeper = gatekeeper
        self.store = ObjectStore(settings)
        self.results = ResultsStore(settings.postgres_dsn)
        self.follower = RegistryFollower(settings, registry, self._on_registry_change)
        self._servers: dict[str, VersionServer] = {}  # by "name/version"
        self._server_lock = asyncio.Lock()
        self._started = False
        self._start_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Idempotent: every agent awaits it before its first message."""
        async with self._start_lock:
            if self._started:
                return
            try:
                await asyncio.to_thread(self.store.ensure_bucket)
                await self.results.start()
                if self.gatekeeper is not None:
                    await self.gatekeeper.start(self.results.pool)
                await self.follower.start()  # replays the registry: loads every served version
            except BaseException:
                await self._release()  # a retried start must not pile up connections
                raise
            self._started = True

    async def stop(self) -> None:
        await self._release()
        self._started = False

    async def _release(self) -> None:
        await self.follower.stop()
        for server in self._servers.values():
            await server.stop()
        self._servers.clear()
        if self.gatekeeper is not None:
            await self.gatekeeper.stop()
        await self.results.stop()

    def breaker_states(self) -> list[tuple[str, str, str, str]]:
        """(model, version, backend, breaker state) of every loaded backend."""
        return [(server.info.name, server.info.version, backend, state)
                for server in list(self._servers.values()) for backend, state in server.balancer.states().items()]

    async def _on_registry_change(self, info: ModelInfo) -> None:
        """Load, reload or drop a version's backends when its record changes."""
        if info.name not in self.serve:
            return
        async with self._server_lock:
            current = self._servers.get(info.key)
            if info.status == "retired":
                if current is not None:
                    await self._servers.pop(info.key).stop()
                return
            if current is not None and _same_serving(current.info, info):
                current.info = info  # weights and status: the router reads the registry
                return
            try:
                local = await asyncio.to_thread(fetch_artifact, info, self.store, self.settings.state_dir / "artifacts")
                server = await VersionServer.create(local, self.settings)
            except Exception:  # noqa: BLE001 - a bad version must not take the worker down
                log.exception("cannot serve %s", info.key)
                return
            self._servers[info.key] = server
            if current is not None:
                await current.stop()
            log.info("serving %s on %s", info.key, [b.name for b in server.backends])

    # -- intake ------------------------------------------------------------------------------

    async def intake(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Authenticate, rate-limit, validate and route each request to its model's topic."""
        now = events.now_ms()
        decoded: list[tuple[Message, events.Request, Span]] = []
        for msg in messages:
            span = tracing.start_span("intake", msg.headers)
            request: InferenceRequest | None = None
            try:
                self._check_size(msg)
                parsed = events.decode_request(msg.value)
                request = parsed.header
                check_deadline(request, now)
                decoded.append((msg, parsed, span))
            except EventError as error:
                await self.reject(outbox, msg, error, request, "intake", span)
                span.end()
        admitted = await self._admit([parsed.header for _, parsed, _ in decoded])
        for (msg, parsed, span), principal in zip(decoded, admitted):
            try:
                await self._route(outbox, msg, parsed, principal, span, now)
            finally:
                span.end()
        await outbox.flush()

    async def _route(self, outbox: Outbox, msg: Message, parsed: events.Request,
                     principal: Principal | EventError | None, span: Span, now: int) -> None:
        request = parsed.header
        if isinstance(principal, EventError):
            await self.refuse(outbox, request, principal, "intake", span)
            return
        try:
            key = msg.key or request.request_id.encode()
            route = self.router.route(request, now, key=key.decode(errors="replace"))
            if parsed.tensors:
                check_inputs(route.model, parsed.tensors)
        except EventError as error:
            await self.reject(outbox, msg, error, request, "intake", span)
            return
        headers = [*tracing.with_trace(msg.headers, span), (VERSION_HEADER, route.model.version.encode())]
        if principal is not None:
            headers.append((TENANT_HEADER, principal.tenant.encode()))
        await outbox.put(route.topic, key, msg.value, headers)
        for shadow in self.registry.shadows(route.model.name):
            await self._mirror(outbox, parsed, route.topic, shadow, headers)
        REQUESTS.labels("intake", "ok").inc()
        log_request(span, "intake", "routed", request.request_id, model=route.model.name,
                    version=route.model.version, tenant=principal.tenant if principal else None)

    async def _admit(self, requests: list[InferenceRequest]) -> list[Principal | EventError | None]:
        """Per request: the caller's Principal (None without a gatekeeper) or the EventError
        that refuses it. Checked concurrently: each may wait on Redis."""
        if self.gatekeeper is None:
            return [None] * len(requests)
        return list(await asyncio.gather(*(self.gatekeeper.admit(request) for request in requests)))

    async def _mirror(self, outbox: Outbox, parsed: events.Request, topic: str, shadow: ModelInfo,
                      headers: Headers) -> None:
        """A copy for a shadow version: its own request id, no reply, result stored only."""
        header = parsed.header.model_copy(update={
            "request_id": f"{parsed.header.request_id}.shadow.{shadow.version}", "version": shadow.version,
            "shadow_of": parsed.header.request_id, "reply_to": None, "correlation_id": None,
        })
        headers = [(k, v) for k, v in headers if k != VERSION_HEADER] + [(VERSION_HEADER, shadow.version.encode())]
        await outbox.put(topic, header.request_id.encode(), events.encode_request(header, parsed.tensors), headers)

    def _check_size(self, msg: Message) -> None:
        if len(msg.value) > self.settings.max_message_bytes:
            raise EventError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"{len(msg.value)} bytes is over {self.settings.max_message_bytes}; send large"
                " tensors by S3 reference (inputs_ref)",
            )

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Run every valid request on its version's backends (micro-batched), then reply."""
        started = events.now_ms()
        accepted: list[tuple[Message, InferenceRequest, ModelInfo, Span, Awaitable[Outcome]]] = []
        for msg in messages:
            span = tracing.start_span("inference", msg.headers)
            request: InferenceRequest | None = None
            try:
                decoded = events.decode_request(msg.value)
                request = decoded.header
                check_deadline(request, started)
                info = self.registry.resolve(request.model, _header(msg, VERSION_HEADER) or request.version)
                request.tenant = _header(msg, TENANT_HEADER) or request.tenant
                tensors = decoded.tensors
                if request.inputs_ref:
                    _, tensors = events.decode_bundle(await self.store.aget(request.inputs_ref))
                check_inputs(info, tensors)
                server = self._servers.get(info.key)
                if server is None:
                    raise EventError(ErrorCode.UNAVAILABLE, f"{info.key} is not loaded in this worker")
                LATENCY.labels("queue_wait", info.name).observe(max(0, started - request.created_ms) / 1000)
                accepted.append((msg, request, info, span, asyncio.ensure_future(server.submit(tensors))))
            except EventError as error:
                await self.reject(outbox, msg, error, request, "inference", span)
                span.end()
        for msg, request, info, span, pending in accepted:
            try:
                await self._answer(outbox, msg, request, info, span, pending, started)
            finally:
                span.end()
        await outbox.flush()

    async def _answer(self, outbox: Outbox, msg: Message, request: InferenceRequest, info: ModelInfo, span: Span,
                      pending: Awaitable[Outcome], started: int) -> None:
        try:
            outcome = await pending
        except EventError as error:
            if error.code == ErrorCode.UNAVAILABLE:
                await self.refuse(outbox, request, error, "inference", span)  # an outage, not a bad event
            else:
                await self.reject(outbox, msg, error, request, "inference", span)
            return
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop the agent
            log.exception("inference failed for %s", request.request_id)
            failure = EventError(ErrorCode.INFERENCE_FAILED, str(error))
            await self.reject(outbox, msg, failure, request, "inference", span)
            return
        await self._reply_ok(outbox, request, info, outcome, started, span)

    async def _reply_ok(
        self, outbox: Outbox, request: InferenceRequest, info: ModelInfo, outcome: Outcome, started: int, span: Span,
    ) -> None:
        result = InferenceResult(
            request_id=request.request_id,
            correlation_id=request.correlation_id,
            model=info.name,
            model_version=info.version,
            status=Status.OK,
            batch_size=outcome.batch_size,
            backend=outcome.backend,
            tenant=request.tenant,
            batch_id=request.batch_id,
            shadow_of=request.shadow_of,
            created_ms=request.created_ms,
        )
        outputs = outcome.outputs
        bundle = events.encode_bundle(outputs)
        if len(bundle) > self.settings.claim_check_bytes:
            # Claim check: the object key is the request id, so a redelivery rewrites it.
            result.outputs_ref = await self.store.aput(f"results/{info.name}/{request.request_id}.bin", bundle)
            outputs = {}
        total_ms = max(0.0, events.now_ms() - request.created_ms)
        result.timings_ms = {
            "queue": max(0.0, started - request.created_ms),
            "inference": round(outcome.inference_ms, 3),
            "total": total_ms,
        }
        await self._emit_result(outbox, result, outputs, request.reply_to, span, reply=_answers_caller(request))
        REQUESTS.labels("inference", "ok").inc()
        LATENCY.labels("end_to_end", info.name).observe(total_ms / 1000)
        span.set_attributes({"inferstream.backend": outcome.backend, "inferstream.batch_size": outcome.batch_size})
        log_request(span, "inference", "answered", request.request_id, model=info.name, version=info.version,
                    backend=outcome.backend, batch_size=outcome.batch_size, total_ms=total_ms)

    # -- results -----------------------------------------------------------------------------

    async def _emit_result(
        self, outbox: Outbox, result: InferenceResult, outputs: dict[str, np.ndarray] | None,
        reply_to: str | None, span: Span, reply: bool = True,
    ) -> None:
        value = events.encode_result(result, outputs)
        key = result.request_id.encode()
        headers = [("request_id", key)]
        if result.correlation_id:
            headers.append(("correlation_id", result.correlation_id.encode()))
        headers = tracing.with_trace(headers, span)
        # An invalid reply_to was already rejected; its error goes to the default replies topic.
        reply_topic = reply_to if reply_to and valid_topic(reply_to) else self.topics.replies
        if reply:
            reply_key = (result.correlation_id or result.request_id).encode()
            await outbox.put(reply_topic, reply_key, value, headers)
        await outbox.put(self.topics.results, key, value, headers)

    async def refuse(self, outbox: Outbox, request: InferenceRequest, error: EventError, stage: str,
                     span: Span) -> None:
        """An error result for a request refused by policy or an outage (auth, rate limit, no
        backend): the caller and the results table hear of it; it is no bad event to dead-letter."""
        REQUESTS.labels(stage, "refused").inc()
        ERRORS.labels(stage, error.code.value).inc()
        tracing.fail(span, error.code.value, error.message)
        log_request(span, stage, "refused", request.request_id, logging.WARNING, code=error.code.value,
                    error=error.message)
        result = InferenceResult(
            request_id=request.request_id, correlation_id=request.correlation_id, model=request.model,
            status=Status.ERROR, error=ErrorInfo(code=error.code, message=error.message),
            tenant=request.tenant, batch_id=request.batch_id, shadow_of=request.shadow_of,
            created_ms=request.created_ms,
        )
        await self._emit_result(outbox, result, None, request.reply_to, span, reply=_answers_caller(request))

    async def reject(
        self, outbox: Outbox, msg: Message, error: EventError, request: InferenceRequest | None, stage: str,
        span: Span,
    ) -> None:
        """Dead-letter the event with its reason and, where the caller is known, reply with the error."""
        request_id, reply_to, correlation_id = (
            (request.request_id, request.reply_to, request.correlation_id)
            if request else events.reply_address(msg.value)
        )
        REQUESTS.labels(stage, "rejected").inc()
        ERRORS.labels(stage, error.code.value).inc()
        DEAD_LETTERS.labels(stage, error.code.value).inc()
        tracing.fail(span, error.code.value, error.message)
        log_request(span, stage, "rejected", request_id, logging.WARNING, code=error.code.value,
                    error=error.message, source=f"{msg.topic}[{msg.partition}]@{msg.offset}")
        letter = DeadLetter(
            reason=error.code, message=error.message, source_topic=msg.topic,
            source_partition=msg.partition, source_offset=msg.offset, request_id=request_id,
            original_b64=base64.b64encode(msg.value).decode(),
        )
        await outbox.put(self.topics.deadletter, msg.key, events.encode_dead_letter(letter),
                         tracing.with_trace(msg.headers, span))
        if request_id is None:
            return
        result = InferenceResult(
            request_id=request_id, correlation_id=correlation_id,
            model=request.model if request else None, status=Status.ERROR,
            error=ErrorInfo(code=error.code, message=error.message),
            tenant=request.tenant if request else None,
            batch_id=request.batch_id if request else None,
            shadow_of=request.shadow_of if request else None,
            created_ms=request.created_ms if request else None,
        )
        await self._emit_result(outbox, result, None, reply_to, span,
                                reply=request is None or _answers_caller(request))

    # -- sink --------------------------------------------------------------------------------

    async def sink(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Upsert a batch of results into PostgreSQL."""
        rows: list[StoredResult] = []
        stored: list[tuple[Message, InferenceResult, Span]] = []
        try:
            for msg in messages:
                span = tracing.start_span("sink", msg.headers)
                try:
                    decoded = events.decode_result(msg.value)
                except EventError as error:
                    await self.reject(outbox, msg, error, None, "sink", span)
                    span.end()
                    continue
                outputs = events.encode_bundle(decoded.tensors) if decoded.tensors else None
                rows.append(StoredResult(decoded.header, outputs, msg.partition, msg.offset))
                stored.append((msg, decoded.header, span))
            if rows:
                await self.results.upsert(rows)
            await outbox.flush()
            now = events.now_ms()
            for msg, result, span in stored:
                REQUESTS.labels("sink", "ok").inc()
                if msg.timestamp_ms:
                    LATENCY.labels("sink_delay", result.model or "").observe(max(0, now - msg.timestamp_ms) / 1000)
                log_request(span, "sink", "stored", result.request_id, model=result.model, status=result.status.value)
        finally:
            for _, _, span in stored:
                span.end()


def _header(msg: Message, name: str) -> str | None:
    for key, value in msg.headers:
        if key == name:
            return value.decode()
    return None


def _answers_caller(request: InferenceRequest) -> bool:
    """Shadow and replayed copies only store their results: no caller waits for them."""
    return request.shadow_of is None and request.replay_of is None


def _same_serving(old: ModelInfo, new: ModelInfo) -> bool:
    """Whether the loaded backends still fit the new record (weights/status need no reload)."""
    fields = ("artifact", "path", "backends", "max_batch_size", "max_batch_delay_ms", "inputs", "outputs")
    return all(getattr(old, f) == getattr(new, f) for f in fields)
