"""The intake stage: decode, authenticate, check, rate-limit and route each request."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.trace import Span

from streams.gate.auth import Principal, principal_from_claims
from streams.gate.gatekeeper import Gatekeeper
from streams.kafka.outbox import Outbox
from streams.registry.records import ModelInfo, ModelRegistry
from streams.registry.routing import Route, Router, check_deadline, check_inputs
from streams.settings import Settings
from streams.storage.claims import Claim, RequestClaims, Seen, request_digest, seen
from streams.storage.objects import ObjectStore
from streams.storage.results import ResultsStore
from streams.telemetry import tracing
from streams.telemetry.logs import log_request
from streams.telemetry.metrics import REQUESTS
from streams.worker.answers import Answers
from streams.worker.failures import as_event_error
from streams.worker.inference import Inference, Work
from streams.worker.message import Message
from streams.worker.reply_topics import ReplyTopics
from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import InferenceRequest
from topics.names import Topics
from topics.seal import SEAL_HEADER, SealError

log = logging.getLogger(__name__)


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


class Intake:
    """The one door of callers (the requests topic)."""

    def __init__(self, settings: Settings, topics: Topics, registry: ModelRegistry, gatekeeper: Gatekeeper | None,
                 store: ObjectStore, results: ResultsStore, reply_topics: ReplyTopics, answers: Answers,
                 inference: Inference) -> None:
        self.settings = settings
        self.topics = topics
        self.registry = registry
        self.router = Router(registry, topics)
        self.gatekeeper = gatekeeper
        self.store = store
        self.results = results
        self.claims = RequestClaims(lambda: results.pool)
        self.reply_topics = reply_topics
        self.answers = answers
        self.inference = inference

    async def step(self, messages: Sequence[Message], outbox: Outbox) -> None:
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
                await self.answers.reject(outbox, msg, as_event_error(exc), request, "intake", span)
                span.end()
        here: list[Work] = []
        try:
            routed = await self._authorize(outbox, candidates, now)
            for candidate in await self._admit(outbox, routed):
                work = await self._route(outbox, candidate)
                if work is not None:
                    here.append(work)
            await self.inference.serve(outbox, here, now)
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
                await self.answers.refuse(outbox, request, principal, "intake", candidate.span)
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
                    await self.answers.refuse(outbox, request, error, "intake", candidate.span)
                else:
                    await self.answers.reject(outbox, candidate.msg, error, request, "intake", candidate.span)
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
            return principal_from_claims(self.answers.open_seal(msg).get("admission"))
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
                await self.answers.refuse(outbox, candidate.request, refusal, "intake", candidate.span)
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
                await self.answers.refuse(outbox, request, error, "intake", candidate.span, store=False)
                return False
            case _:  # a repeat: the stored answer, or the work again (counted once) while there is none
                stored = (await self.results.answered([request.request_id])).get(request.request_id)
                if stored is None:
                    return True
                await self.answers.answer_again(outbox, request, stored, candidate.span)
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
        if route.model.name in self.inference.serve_models and route.model.key in self.inference.servers:
            span = tracing.start_span("inference", tracing.with_trace([], candidate.span))  # the intake's child
            try:
                work = await self.inference.work(candidate.msg, request, route.model, span, candidate.parsed.tensors)
            except Exception as exc:  # noqa: BLE001 - classified: an outage retries the chunk
                await self.answers.reject(outbox, candidate.msg, as_event_error(exc), request, "inference", span)
                span.end()
                return None
        else:
            key = candidate.msg.key or request.request_id.encode()
            value = events.without_credentials(candidate.msg.value)
            await self.answers.put_sealed(outbox, route.topic, key, value, candidate.span, self._request_claims(
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
        await self.answers.put_sealed(outbox, topic, header.request_id.encode(), value, candidate.span, claims)

    @staticmethod
    def _request_claims(request_id: str, tenant: str | None, model: str, version: str) -> dict[str, str | None]:
        return {"rid": request_id, "tenant": tenant, "model": model, "version": version}

    def _check_size(self, msg: Message) -> None:
        if len(msg.value) > self.settings.max_message_bytes:
            raise EventError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"{len(msg.value)} bytes is over {self.settings.max_message_bytes}; send large"
                " tensors by S3 reference (inputs_ref)",
            )
