"""The work of each agent, free of Faust: the agents hand over consumed messages and an outbox;
these functions decode, validate, route, infer and emit.

Delivery is at-least-once: an agent acknowledges its messages only after the outbox has been
flushed (every send confirmed by the broker), so a crash redelivers instead of losing. Effects
are idempotent: results are upserted by request id, S3 keys derive from the request id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np
import orjson
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry.trace import Span

from streams.gate.auth import Principal, principal_from_claims
from streams.gate.gatekeeper import Gatekeeper
from streams.kafka.outbox import Headers, Outbox
from streams.registry.records import ModelInfo, ModelRegistry
from streams.registry.routing import Route, Router, check_deadline, check_inputs
from streams.registry.store import RegistryFollower, fetch_artifact
from streams.serving.version_server import Outcome, ServerStopped, VersionServer
from streams.settings import Settings
from streams.storage.claims import Claim, RequestClaims, Seen, request_digest, seen
from streams.storage.jobs import JobStore
from streams.storage.objects import ObjectStore
from streams.storage.results import ResultsStore, StoredResult
from streams.telemetry import tracing
from streams.telemetry.logs import log_request
from streams.telemetry.metrics import DEAD_LETTERS, ERRORS, LATENCY, REQUESTS
from streams.telemetry.model_stats import STATS
from streams.worker.batch_jobs import BatchRunner
from streams.worker.deadletters import bounded, dead_letter
from streams.worker.failures import VersionLoading, as_event_error
from streams.worker.reply_topics import ReplyTopics
from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import (
    DeadLetter,
    ErrorInfo,
    InferenceRequest,
    InferenceResult,
    Status,
)
from topics.names import Topics
from topics.seal import SEAL_HEADER, Sealer, SealError

log = logging.getLogger(__name__)



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

    @property
    def source(self) -> str:
        """Where it was read: one admission per place, however often it is redelivered."""
        return f"{self.topic}:{self.partition}:{self.offset}"


@dataclass
class Candidate:
    """A decoded request at the intake, and what the intake establishes about it."""

    msg: Message
    parsed: events.Request
    span: Span
    vouched: Principal | None = None  # the principal the product sealed this request with
    principal: Principal | None = None
    route: Route | None = None
    digest: bytes = b""

    @property
    def request(self) -> InferenceRequest:
        return self.parsed.header

    @property
    def tenant(self) -> str | None:
        return self.principal.tenant if self.principal is not None else None


@dataclass
class Work:
    """An admitted request ready for its version's backends in this worker."""

    msg: Message
    request: InferenceRequest
    info: ModelInfo
    span: Span
    tensors: dict[str, np.ndarray]


INTERNAL_REPLY = "internal error: the request was dead-lettered for the operators"


class Pipeline:
    def __init__(self, settings: Settings, registry: ModelRegistry, serve: list[str],
                 gatekeeper: Gatekeeper | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.registry = registry
        self.router = Router(registry, self.topics)
        self.serve = serve  # models whose inference agents run in this worker
        self.gatekeeper = gatekeeper
        self.store = ObjectStore(settings)
        self.results = ResultsStore(settings.postgres_dsn)
        self.follower = RegistryFollower(settings, registry, self._on_registry_change)
        self.claims = RequestClaims(lambda: self.results.pool)
        self.sealer = Sealer(settings.cluster_secret)
        self._admin: AIOKafkaAdminClient | None = None
        self.reply_topics = ReplyTopics(settings, self._list_topics)
        self._servers: dict[str, VersionServer] = {}  # by "name/version"
        self._unservable: set[str] = set()  # versions of served models that failed to load
        self._server_lock = asyncio.Lock()
        self._started = False
        self._stopping = False
        self._start_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Idempotent: every agent awaits it before its first message."""
        async with self._start_lock:
            if self._started:
                return
            self._stopping = False
            try:
                await asyncio.to_thread(self.store.ensure_bucket)
                await self.results.start()
                if self.gatekeeper is not None:
                    await self.gatekeeper.start(self.results.pool)
                self._admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap,
                                                  request_timeout_ms=15000)
                await self._admin.start()
                await self.follower.start()  # replays the registry: loads every served version
            except BaseException:
                await self._release()  # a retried start must not pile up connections
                raise
            self._started = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def started(self) -> bool:
        """Started and not stopping: the registry replayed, its versions loaded."""
        return self._started and not self._stopping

    def served_versions(self, assigned_topics: set[str]) -> list[str]:
        """The "name/version"s this worker serves: loaded, requests reaching it (a partition of
        the requests topic, which its intake serves here, or of the model's topic), and a backend
        whose breaker is not open."""
        takes_requests = self.topics.requests in assigned_topics
        return [key for key, server in list(self._servers.items())
                if (takes_requests or self.topics.model(server.info.name) in assigned_topics)
                and any(state != "open" for state in server.balancer.states().values())]

    async def stop(self) -> None:
        self._stopping = True  # from now on a missing server means "stopping", not "unavailable"
        await self._release()
        self._started = False

    async def _release(self) -> None:
        await self.follower.stop()
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
        for server in self._servers.values():
            await server.stop()
        self._servers.clear()
        if self.gatekeeper is not None:
            await self.gatekeeper.stop()
        await self.results.stop()

    async def _list_topics(self) -> set[str]:
        if self._admin is None:
            raise RuntimeError("Pipeline.start() was not awaited")
        return set(await self._admin.list_topics())

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
                self._unservable.add(info.key)
                return
            self._unservable.discard(info.key)
            self._servers[info.key] = server
            if current is not None:
                await current.stop()
            log.info("serving %s on %s", info.key, [b.name for b in server.backends])

    # -- intake ------------------------------------------------------------------------------

    async def intake(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """The one door of callers, a chunk at once: authenticate, check, rate-limit and route
        each request, then serve those whose version this worker serves and send the others to
        their model's topic. What it forwards carries no credentials and none of the caller's
        internal headers, and is sealed with what the intake established."""
        now = events.now_ms()
        candidates: list[Candidate] = []
        for msg in messages:
            span = tracing.start_span("intake", msg.headers)
            request: InferenceRequest | None = None
            try:
                self._check_size(msg)
                parsed = events.decode_request(msg.value)
                request = parsed.header
                request.tenant = None  # the caller's word; the tenant is whom the credentials name
                check_deadline(request, now)
                if request.reply_to is not None:
                    await self.reply_topics.check(request.reply_to)
                candidates.append(Candidate(msg, parsed, span, vouched=self._vouched(msg)))
            except Exception as exc:  # noqa: BLE001 - classified: an outage retries the chunk
                await self.reject(outbox, msg, as_event_error(exc), request, "intake", span)
                span.end()
        here: list[Work] = []
        try:
            routed = await self._authorize(outbox, candidates, now)
            for candidate in await self._admit(outbox, routed):
                work = await self._route(outbox, candidate)
                if work is not None:
                    here.append(work)
            await self._serve(outbox, here, now)
        finally:
            for work in here:
                work.span.end()
            for candidate in candidates:
                candidate.span.end()
        await outbox.flush()

    async def _authorize(self, outbox: Outbox, candidates: list[Candidate], now: int) -> list[Candidate]:
        """Authenticate, route and validate; the candidates that passed, with their routes."""
        principals: list[Principal | EventError | None] = [None] * len(candidates)
        if self.gatekeeper is not None:
            principals = list(await self.gatekeeper.authenticate_many([(c.request, c.vouched) for c in candidates]))
        routed = []
        for candidate, principal in zip(candidates, principals):
            request = candidate.request
            if isinstance(principal, EventError):
                await self.refuse(outbox, request, principal, "intake", candidate.span)
                continue
            try:
                if request.inputs_ref is not None:
                    self.store.check_caller_uri(request.inputs_ref)
                candidate.principal = principal
                request.tenant = candidate.tenant
                key = candidate.msg.key or request.request_id.encode()
                candidate.route = self.router.route(request, now, key=key.decode(errors="replace"))
                if candidate.parsed.tensors:
                    check_inputs(candidate.route.model, candidate.parsed.tensors)
                candidate.digest = request_digest(request, candidate.tenant, candidate.parsed.tensors)
            except Exception as exc:  # noqa: BLE001 - classified: an outage retries the chunk
                error = as_event_error(exc)
                if error.code == ErrorCode.FORBIDDEN:
                    await self.refuse(outbox, request, error, "intake", candidate.span)
                else:
                    await self.reject(outbox, candidate.msg, error, request, "intake", candidate.span)
                continue
            routed.append(candidate)
        return routed

    def _vouched(self, msg: Message) -> Principal | None:
        """The owner the product vouches for on a request it wrote itself (a batch's item); None
        for a caller's request, whose credentials decide. A seal that does not open is a caller's
        header like any other: ignored."""
        if not any(k == SEAL_HEADER for k, _ in msg.headers):
            return None
        try:
            return principal_from_claims(self._open(msg).get("admission"))
        except SealError:
            return None

    async def _admit(self, outbox: Outbox, candidates: list[Candidate]) -> list[Candidate]:
        """Idempotency by request id, then rate limits for what is new: the candidates to serve."""
        claims = await self.claims.get(list({c.request.request_id for c in candidates}))
        fresh: dict[str, Candidate] = {}  # the first new event of each id in the chunk
        known: list[Candidate] = []  # ids claimed before, judged by their claim
        later: list[Candidate] = []  # judged once the fresh ones are claimed
        for candidate in candidates:
            rid = candidate.request.request_id
            if rid in claims:
                known.append(candidate)
            elif rid not in fresh:
                fresh[rid] = candidate
            else:
                later.append(candidate)
        admitted = [c for c in known if await self._seen_before(outbox, c, claims[c.request.request_id])]
        refusals = await self._count(list(fresh.values()))
        counted = []
        for candidate, refusal in zip(fresh.values(), refusals):
            if refusal is not None:
                await self.refuse(outbox, candidate.request, refusal, "intake", candidate.span)
            else:
                counted.append(candidate)
        won = await self.claims.claim([Claim(c.request.request_id, c.digest, c.msg.source) for c in counted])
        for candidate in counted:
            if candidate.request.request_id in won:
                admitted.append(candidate)
            else:
                later.append(candidate)  # claimed by another worker meanwhile
        if later:
            claims = await self.claims.get(list({c.request.request_id for c in later}))
            admitted += [c for c in later if await self._seen_before(outbox, c, claims[c.request.request_id])]
        return admitted

    async def _seen_before(self, outbox: Outbox, candidate: Candidate, claim: Claim) -> bool:
        """Answer a request id seen before where that is its answer; whether to serve it again."""
        request = candidate.request
        match seen(claim, candidate.digest, candidate.msg.source):
            case Seen.REDELIVERY:
                return True
            case Seen.CONFLICT:
                error = EventError(ErrorCode.DUPLICATE_REQUEST, f"request id {request.request_id!r} was already"
                                   " admitted with another body; use a new request id")
                await self.refuse(outbox, request, error, "intake", candidate.span, store=False)
                return False
            case _:  # a repeat: the stored answer, or the work again (counted once) while there is none
                stored = (await self.results.answered([request.request_id])).get(request.request_id)
                if stored is None:
                    return True
                await self._answer_again(outbox, request, stored, candidate.span)
                return False

    async def _count(self, candidates: list[Candidate]) -> list[EventError | None]:
        """Each candidate's rate-limit refusal or None, counted in one round trip."""
        if self.gatekeeper is None or not candidates:
            return [None] * len(candidates)
        return await self.gatekeeper.count_many([(c.principal, c.msg.source) for c in candidates])

    async def _route(self, outbox: Outbox, candidate: Candidate) -> Work | None:
        """An admitted request: served in this worker when it serves the version (its Work), else
        sent to the model's topic for the worker group that does (None). Shadow copies always
        go through the topic: no caller waits for them."""
        request, route = candidate.request, candidate.route
        assert route is not None
        work: Work | None = None
        if route.model.name in self.serve and route.model.key in self._servers:
            span = tracing.start_span("inference", tracing.with_trace([], candidate.span))  # the intake's child
            try:
                work = await self._work(candidate.msg, request, route.model, span, candidate.parsed.tensors)
            except Exception as exc:  # noqa: BLE001 - classified: an outage retries the chunk
                await self.reject(outbox, candidate.msg, as_event_error(exc), request, "inference", span)
                span.end()
                return None
        else:
            key = candidate.msg.key or request.request_id.encode()
            value = events.without_credentials(candidate.msg.value)
            await self._put_sealed(outbox, route.topic, key, value, candidate.span, self._request_claims(
                request.request_id, candidate.tenant, route.model.name, route.model.version))
        for shadow in self.registry.shadows(route.model.name):
            await self._mirror(outbox, candidate, route.topic, shadow)
        REQUESTS.labels("intake", "ok").inc()
        log_request(candidate.span, "intake", "admitted", request.request_id, model=route.model.name,
                    version=route.model.version, tenant=candidate.tenant, here=work is not None)
        return work

    async def _mirror(self, outbox: Outbox, candidate: Candidate, topic: str, shadow: ModelInfo) -> None:
        """A copy for a shadow version: its own request id, no reply, result stored only."""
        origin = candidate.request
        header = origin.model_copy(update={
            "request_id": f"{origin.request_id}.shadow.{shadow.version}", "version": shadow.version,
            "shadow_of": origin.request_id, "reply_to": None, "correlation_id": None, "credentials": None,
        })
        claims = self._request_claims(header.request_id, candidate.tenant, shadow.name, shadow.version)
        value = events.encode_request(header, candidate.parsed.tensors)
        await self._put_sealed(outbox, topic, header.request_id.encode(), value, candidate.span, claims)

    @staticmethod
    def _request_claims(request_id: str, tenant: str | None, model: str, version: str) -> dict[str, str | None]:
        return {"rid": request_id, "tenant": tenant, "model": model, "version": version}

    async def _put_sealed(self, outbox: Outbox, topic: str, key: bytes | None, value: bytes, span: Span,
                          claims: dict[str, str | None], headers: Headers | None = None) -> None:
        """Send an event to an internal topic: the trace context, the seal, nothing of the caller's."""
        sealed = [*tracing.with_trace(headers or [], span), self.sealer.seal(topic, key, value, claims)]
        await outbox.put(topic, key, value, sealed)

    def batch_command(self, msg: Message) -> tuple[str, dict[str, Any] | None]:
        """The batch id of a batch job command, which only the product writes, and the claims of
        the principal who submitted it (sealed onto each of its items)."""
        try:
            claims = self._open(msg)
        except SealError as exc:
            raise EventError(ErrorCode.UNAUTHENTICATED, f"batch command not written by the product ({exc})") from None
        batch_id = claims.get("batch")
        if not isinstance(batch_id, str) or not batch_id:
            raise EventError(ErrorCode.INVALID_SCHEMA, "batch command without a batch id")
        return batch_id, claims.get("admission")

    async def batches(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Batch job commands: each batch runs to its end (its output written) before the next."""
        runner = BatchRunner(self.settings, self.registry, self.store, JobStore(self.results.pool))
        for message in messages:
            try:
                batch_id, owner = self.batch_command(message)
            except EventError as error:
                span = tracing.start_span("batches", message.headers)
                await self.reject(outbox, message, error, None, "batches", span, answer=False)
                span.end()
                continue
            await runner.run(batch_id, owner, outbox)
        await outbox.flush()

    def _open(self, msg: Message) -> dict[str, Any]:
        """The claims of an event on an internal topic; SealError unless the product wrote it."""
        return self.sealer.open(msg.topic, msg.key, msg.value, msg.headers)

    def _check_size(self, msg: Message) -> None:
        if len(msg.value) > self.settings.max_message_bytes:
            raise EventError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"{len(msg.value)} bytes is over {self.settings.max_message_bytes}; send large"
                " tensors by S3 reference (inputs_ref)",
            )

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Requests the intake of another worker sent to this model's topic: checked, then served."""
        started = events.now_ms()
        works: list[Work] = []
        try:
            for msg in messages:
                span = tracing.start_span("inference", msg.headers)
                request: InferenceRequest | None = None
                try:
                    claims = self._open(msg)
                except SealError as exc:
                    error = EventError(ErrorCode.UNAUTHENTICATED, f"not admitted by the intake ({exc}): send"
                                       f" requests to {self.topics.requests}")
                    await self.reject(outbox, msg, error, None, "inference", span, answer=False)
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
                    works.append(await self._work(msg, request, info, span, decoded.tensors))
                except Exception as exc:  # noqa: BLE001 - classified: an outage retries the chunk
                    await self.reject(outbox, msg, as_event_error(exc), request, "inference", span)
                    span.end()
            await self._serve(outbox, works, started)
        finally:
            for work in works:
                work.span.end()
        await outbox.flush()

    async def _work(self, msg: Message, request: InferenceRequest, info: ModelInfo, span: Span,
                    tensors: dict[str, np.ndarray]) -> Work:
        """A request ready for its version's backends in this worker; raises what to reject it for."""
        if request.inputs_ref:
            self.store.check_caller_uri(request.inputs_ref)
            _, tensors = events.decode_bundle(await self.store.aget(request.inputs_ref))
        check_inputs(info, tensors)
        if info.key not in self._servers:
            if self._stopping:
                raise ServerStopped(f"{info.key}: this worker is stopping")
            if info.name in self.serve and info.key not in self._unservable:
                raise VersionLoading(f"{info.key} is not loaded in this worker yet")
            raise EventError(ErrorCode.UNAVAILABLE, f"{info.key} is not loaded in this worker")
        return Work(msg, request, info, span, tensors)

    async def _serve(self, outbox: Outbox, works: list[Work], started: int) -> None:
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
        server = self._servers.get(works[0].info.key)
        if server is None:
            gone: BaseException = (ServerStopped(f"{works[0].info.key}: this worker is stopping") if self._stopping
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
                await self.refuse(outbox, request, outcome, "inference", work.span)  # an outage, not a bad event
            else:
                await self.reject(outbox, work.msg, outcome, request, "inference", work.span)
            return
        log.error("inference failed for %s", request.request_id, exc_info=outcome)
        failure = EventError(ErrorCode.INFERENCE_FAILED, str(outcome))
        await self.reject(outbox, work.msg, failure, request, "inference", work.span)

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
        await self._emit_result(outbox, result, outputs, self._reply_topic(request), span)
        STATS.success(info.name, info.version, _rows(info, outcome.outputs), total_ms, outcome.inference_ms,
                      events.now_ms())
        REQUESTS.labels("inference", "ok").inc()
        LATENCY.labels("end_to_end", info.name).observe(total_ms / 1000)
        span.set_attributes({"inferstream.backend": outcome.backend, "inferstream.batch_size": outcome.batch_size})
        log_request(span, "inference", "answered", request.request_id, model=info.name, version=info.version,
                    backend=outcome.backend, batch_size=outcome.batch_size, total_ms=total_ms)

    # -- results -----------------------------------------------------------------------------

    async def _emit_result(
        self, outbox: Outbox, result: InferenceResult, outputs: dict[str, np.ndarray] | None,
        reply_topic: str | None, span: Span, store: bool = True,
    ) -> None:
        """The result to the caller's reply topic (None: no caller waits) and, sealed, to the
        results topic (unless `store` is false)."""
        value = events.encode_result(result, outputs)
        key = result.request_id.encode()
        headers = [("request_id", key)]
        if result.correlation_id:
            headers.append(("correlation_id", result.correlation_id.encode()))
        headers = tracing.with_trace(headers, span)
        if reply_topic is not None:
            reply_key = (result.correlation_id or result.request_id).encode()
            await outbox.put(reply_topic, reply_key, value, headers)
        if store:
            await self._put_sealed(outbox, self.topics.results, key, value, span, {"rid": result.request_id}, headers)

    def _reply_topic(self, request: InferenceRequest) -> str | None:
        """Where an admitted request is answered: its reply_to (checked at the intake), else the
        default replies topic; None for copies no caller waits for."""
        return (request.reply_to or self.topics.replies) if _answers_caller(request) else None

    async def _answer_again(self, outbox: Outbox, request: InferenceRequest, stored: asyncpg.Record,
                            span: Span) -> None:
        """A repeated request: its stored answer, with this caller's correlation id."""
        result = InferenceResult(
            request_id=request.request_id, correlation_id=request.correlation_id, model=stored["model"],
            model_version=stored["model_version"], status=Status.OK, outputs_ref=stored["outputs_ref"],
            batch_size=stored["batch_size"], tenant=stored["tenant"], batch_id=stored["batch_id"],
            shadow_of=stored["shadow_of"], created_ms=request.created_ms,
            timings_ms=orjson.loads(stored["timings_ms"]) if isinstance(stored["timings_ms"], str)
            else dict(stored["timings_ms"] or {}),
        )
        outputs = events.decode_bundle(stored["outputs"])[1] if stored["outputs"] is not None else None
        await self._emit_result(outbox, result, outputs, self._reply_topic(request), span, store=False)
        REQUESTS.labels("intake", "repeated").inc()
        log_request(span, "intake", "answered again", request.request_id, model=result.model)

    async def refuse(self, outbox: Outbox, request: InferenceRequest, error: EventError, stage: str,
                     span: Span, store: bool = True) -> None:
        """An error result for a request refused by policy or an outage (auth, rate limit, no
        backend): the caller and (unless `store` is false) the results table hear of it; it is no
        bad event to dead-letter."""
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
        await self._emit_result(outbox, result, None, self._reply_topic(request), span, store=store)

    async def reject(
        self, outbox: Outbox, msg: Message, error: EventError, request: InferenceRequest | None, stage: str,
        span: Span, answer: bool = True,
    ) -> None:
        """Dead-letter the event with its reason and, where the caller is known (and `answer`:
        not for events from outside the product on internal topics), reply with the error."""
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
        letter, letter_key, letter_headers = await dead_letter(msg, error.code, error.message, request_id,
                                                               self.store.aput, self.settings)
        await outbox.put(self.topics.deadletter, letter_key, events.encode_dead_letter(letter),
                         tracing.with_trace(letter_headers, span))
        if request_id is None or not answer:
            return
        # A bug's details (exception text, paths) are for the operators' dead letter only.
        told = INTERNAL_REPLY if error.code == ErrorCode.INTERNAL else error.message
        result = InferenceResult(
            request_id=request_id, correlation_id=correlation_id,
            model=request.model if request else None, status=Status.ERROR,
            error=ErrorInfo(code=error.code, message=told),
            tenant=request.tenant if request else None,
            batch_id=request.batch_id if request else None,
            shadow_of=request.shadow_of if request else None,
            created_ms=request.created_ms if request else None,
        )
        if stage == "intake" or request is None:
            # Not admitted: the reply address is the caller's word, used only where it passes.
            reply_topic: str | None = self.reply_topics.resolve(reply_to)
        else:
            reply_topic = self._reply_topic(request)
        await self._emit_result(outbox, result, None, reply_topic, span)

    async def dead_letter_bare(self, outbox: Outbox, msg: Message, error: EventError) -> None:
        """A dead letter with the event's place and reason only: the last resort when the full
        one cannot be written. The original stays in its topic until retention removes it."""
        letter = DeadLetter(
            reason=error.code, message=bounded(f"{error.message} (original not kept: see the source topic)"),
            source_topic=msg.topic, source_partition=msg.partition, source_offset=msg.offset,
        )
        await outbox.put(self.topics.deadletter, None, events.encode_dead_letter(letter), [])

    # -- sink --------------------------------------------------------------------------------

    async def sink(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Upsert a batch of results into PostgreSQL."""
        rows: list[StoredResult] = []
        stored: list[tuple[Message, InferenceResult, Span]] = []
        try:
            for msg in messages:
                span = tracing.start_span("sink", msg.headers)
                try:
                    claims = self._open(msg)
                    result, outputs = events.decode_result_to_store(msg.value)
                    if claims.get("rid") != result.request_id:
                        raise SealError("the seal's claims do not match the result")
                except SealError as exc:
                    error = EventError(ErrorCode.UNAUTHENTICATED, f"not written by the product ({exc})")
                    await self.reject(outbox, msg, error, None, "sink", span, answer=False)
                    span.end()
                    continue
                except Exception as exc:  # noqa: BLE001 - classified: an outage retries the chunk
                    await self.reject(outbox, msg, as_event_error(exc), None, "sink", span, answer=False)
                    span.end()
                    continue
                rows.append(StoredResult(result, outputs, msg.partition, msg.offset))
                stored.append((msg, result, span))
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


def _answers_caller(request: InferenceRequest) -> bool:
    """Shadow and replayed copies only store their results: no caller waits for them."""
    return request.shadow_of is None and request.replay_of is None


def _rows(info: ModelInfo, outputs: dict[str, np.ndarray]) -> int:
    """Inferences in a request: the length of its batch axis, or 1 for a model without one."""
    first = next(iter(outputs.values()), None)
    return int(first.shape[0]) if info.max_batch_size > 0 and first is not None and first.ndim else 1


def _same_serving(old: ModelInfo, new: ModelInfo) -> bool:
    """Whether the loaded backends still fit the new record (weights/status need no reload)."""
    fields = ("artifact", "path", "backends", "max_batch_size", "max_batch_delay_ms", "inputs", "outputs")
    return all(getattr(old, f) == getattr(new, f) for f in fields)
