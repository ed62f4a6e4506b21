"""The inference stage and the model versions this worker serves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from opentelemetry.trace import Span

from streams.kafka.outbox import Outbox
from streams.registry.records import ModelInfo, ModelRegistry
from streams.registry.routing import check_deadline, check_inputs
from streams.registry.store import fetch_artifact
from streams.serving.version_server import Outcome, ServerStopped, VersionServer
from streams.settings import Settings
from streams.storage.objects import ObjectStore
from streams.telemetry import tracing
from streams.telemetry.logs import log_request
from streams.telemetry.metrics import LATENCY, REQUESTS
from streams.telemetry.model_stats import STATS
from streams.worker.answers import Answers
from streams.worker.failures import VersionLoading, as_event_error
from streams.worker.message import Message
from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import InferenceRequest, InferenceResult, Status
from topics.names import Topics
from topics.seal import SealError

log = logging.getLogger(__name__)


@dataclass
class Work:
    """An admitted request ready for its version's backends in this worker."""

    msg: Message
    request: InferenceRequest
    info: ModelInfo
    span: Span
    tensors: dict[str, np.ndarray]


class Inference:
    """The versions this worker serves, loaded and reloaded as the registry changes, and the
    inference stage: requests the intake of another worker sent to a model topic, or handed over
    in place by this worker's intake, micro-batched on the version's backends and answered."""

    def __init__(self, settings: Settings, topics: Topics, registry: ModelRegistry, serve: list[str],
                 store: ObjectStore, answers: Answers) -> None:
        self.settings = settings
        self.topics = topics
        self.registry = registry
        self.serve_models = serve  # models whose inference agents run in this worker
        self.store = store
        self.answers = answers
        self.servers: dict[str, VersionServer] = {}  # by "name/version"
        self.unservable: set[str] = set()  # versions of served models that failed to load
        self._server_lock = asyncio.Lock()
        self.stopping = False

    async def stop(self) -> None:
        """Stop every version's backends (`stopping` is set: a missing server means "stopping")."""
        self.stopping = True
        for server in self.servers.values():
            await server.stop()
        self.servers.clear()

    def served_versions(self, assigned_topics: set[str]) -> list[str]:
        """The "name/version"s this worker serves: loaded, requests reaching it (a partition of
        the requests topic, which its intake serves here, or of the model's topic), and a backend
        whose breaker is not open."""
        takes_requests = self.topics.requests in assigned_topics
        return [key for key, server in list(self.servers.items())
                if (takes_requests or self.topics.model(server.info.name) in assigned_topics)
                and any(state != "open" for state in server.balancer.states().values())]

    def breaker_states(self) -> list[tuple[str, str, str, str]]:
        """(model, version, backend, breaker state) of every loaded backend."""
        return [(server.info.name, server.info.version, backend, state)
                for server in list(self.servers.values()) for backend, state in server.balancer.states().items()]

    async def on_registry_change(self, info: ModelInfo) -> None:
        """Load, reload or drop a version's backends when its record changes."""
        if info.name not in self.serve_models:
            return
        async with self._server_lock:
            current = self.servers.get(info.key)
            if info.status == "retired":
                if current is not None:
                    await self.servers.pop(info.key).stop()
                return
            if current is not None and _same_serving(current.info, info):
                current.info = info  # weights and status: the router reads the registry
                return
            try:
                local = await asyncio.to_thread(fetch_artifact, info, self.store, self.settings.state_dir / "artifacts")
                server = await VersionServer.create(local, self.settings)
            except Exception:  # noqa: BLE001 - a bad version must not take the worker down
                log.exception("cannot serve %s", info.key)
                self.unservable.add(info.key)
                return
            self.unservable.discard(info.key)
            self.servers[info.key] = server
            if current is not None:
                await current.stop()
            log.info("serving %s on %s", info.key, [b.name for b in server.backends])

    async def step(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Requests the intake of another worker sent to this model's topic: checked, then served."""
        started = events.now_ms()
        works: list[Work] = []
        try:
            for msg in messages:
                span = tracing.start_span("inference", msg.headers)
                request: InferenceRequest | None = None
                try:
                    claims = self.answers.open_seal(msg)
                except SealError as exc:
                    error = EventError(ErrorCode.UNAUTHENTICATED, f"not admitted by the intake ({exc}): send"
                                       f" requests to {self.topics.requests}")
                    await self.answers.reject(outbox, msg, error, None, "inference", span, answer=False)
                    span.end()
                    continue
                try:
                    decoded = events.decode_request(msg.value)
                    request = decoded.header
                    if claims.get("rid") != request.request_id or claims.get("model") != request.model:
                        raise EventError(ErrorCode.INTERNAL, "the seal's claims do not match the request")
                    check_deadline(request, started)
                    info = self.registry.resolve(request.model, claims.get("version"))
                    request.tenant = claims.get("tenant")
                    works.append(await self.work(msg, request, info, span, decoded.tensors))
                except Exception as exc:  # noqa: BLE001 - classified: an outage retries the chunk
                    await self.answers.reject(outbox, msg, as_event_error(exc), request, "inference", span)
                    span.end()
            await self.serve(outbox, works, started)
        finally:
            for work in works:
                work.span.end()
        await outbox.flush()

    async def work(self, msg: Message, request: InferenceRequest, info: ModelInfo, span: Span,
                    tensors: dict[str, np.ndarray]) -> Work:
        """A request ready for its version's backends in this worker; raises what to reject it for."""
        if request.inputs_ref:
            self.store.check_caller_uri(request.inputs_ref)
            _, tensors = events.decode_bundle(await self.store.aget(request.inputs_ref))
        check_inputs(info, tensors)
        if info.key not in self.servers:
            if self.stopping:
                raise ServerStopped(f"{info.key}: this worker is stopping")
            if info.name in self.serve_models and info.key not in self.unservable:
                raise VersionLoading(f"{info.key} is not loaded in this worker yet")
            raise EventError(ErrorCode.UNAVAILABLE, f"{info.key} is not loaded in this worker")
        return Work(msg, request, info, span, tensors)

    async def serve(self, outbox: Outbox, works: list[Work], started: int) -> None:
        """Run a chunk's work on its versions' backends, one submission per version, and answer
        each request. A worker that stops meanwhile answers none: the chunk is retried."""
        by_version: dict[str, list[Work]] = {}
        for work in works:
            by_version.setdefault(work.info.key, []).append(work)
            LATENCY.labels("queue_wait", work.info.name).observe(max(0, started - work.request.created_ms) / 1000)
        groups = list(by_version.values())
        outcomes = await asyncio.gather(*(self._submit(group) for group in groups))  # a task per version
        answers = [(work, outcome) for group, results in zip(groups, outcomes) for work, outcome in zip(group, results)]
        for _, outcome in answers:
            if isinstance(outcome, ServerStopped):
                raise outcome
        for work, outcome in answers:
            await self._answer(outbox, work, outcome, started)

    async def _submit(self, works: list[Work]) -> list[Outcome | BaseException]:
        server = self.servers.get(works[0].info.key)
        if server is None:
            gone: BaseException = (ServerStopped(f"{works[0].info.key}: this worker is stopping") if self.stopping
                                   else EventError(ErrorCode.UNAVAILABLE, f"{works[0].info.key} was unloaded"))
            return [gone] * len(works)
        return await server.submit([work.tensors for work in works])

    async def _answer(self, outbox: Outbox, work: Work, outcome: Outcome | BaseException, started: int) -> None:
        request, info = work.request, work.info
        if isinstance(outcome, Outcome):
            await self._reply_ok(outbox, request, info, outcome, started, work.span)
            return
        STATS.failure(info.name, info.version, events.now_ms() - request.created_ms)
        if isinstance(outcome, EventError):
            if outcome.code == ErrorCode.UNAVAILABLE:
                # an outage, not a bad event
                await self.answers.refuse(outbox, request, outcome, "inference", work.span)
            else:
                await self.answers.reject(outbox, work.msg, outcome, request, "inference", work.span)
            return
        log.error("inference failed for %s", request.request_id, exc_info=outcome)
        failure = EventError(ErrorCode.INFERENCE_FAILED, str(outcome))
        await self.answers.reject(outbox, work.msg, failure, request, "inference", work.span)

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
        if sum(a.nbytes for a in outputs.values()) > self.settings.claim_check_bytes:
            # Claim check: the object key is the request id, so a redelivery rewrites it.
            result.outputs_ref = await self.store.aput(f"results/{info.name}/{request.request_id}.bin",
                                                       events.encode_bundle(outputs))
            outputs = {}
        total_ms = max(0.0, events.now_ms() - request.created_ms)
        result.timings_ms = {
            "queue": max(0.0, started - request.created_ms),
            "inference": round(outcome.inference_ms, 3),
            "total": total_ms,
        }
        await self.answers.emit_result(outbox, result, outputs, self.answers.reply_topic(request), span)
        STATS.success(info.name, info.version, _rows(info, outcome.outputs), total_ms, outcome.inference_ms,
                      events.now_ms())
        REQUESTS.labels("inference", "ok").inc()
        LATENCY.labels("end_to_end", info.name).observe(total_ms / 1000)
        span.set_attributes({"inferstream.backend": outcome.backend, "inferstream.batch_size": outcome.batch_size})
        log_request(span, "inference", "answered", request.request_id, model=info.name, version=info.version,
                    backend=outcome.backend, batch_size=outcome.batch_size, total_ms=total_ms)


def _rows(info: ModelInfo, outputs: dict[str, np.ndarray]) -> int:
    """Inferences in a request: the length of its batch axis, or 1 for a model without one."""
    first = next(iter(outputs.values()), None)
    return int(first.shape[0]) if info.max_batch_size > 0 and first is not None and first.ndim else 1


def _same_serving(old: ModelInfo, new: ModelInfo) -> bool:
    """Whether the loaded backends still fit the new record (weights/status need no reload)."""
    fields = ("artifact", "path", "backends", "max_batch_size", "max_batch_delay_ms", "inputs", "outputs")
    return all(getattr(old, f) == getattr(new, f) for f in fields)
