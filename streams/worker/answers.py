"""Results, refusals and dead letters: how each stage answers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np
import orjson
from opentelemetry.trace import Span

from streams.kafka.outbox import Headers, Outbox
from streams.settings import Settings
from streams.storage.objects import ObjectStore
from streams.telemetry import tracing
from streams.telemetry.logs import log_request
from streams.telemetry.metrics import DEAD_LETTERS, ERRORS, REQUESTS
from streams.worker.deadletters import bounded, dead_letter
from streams.worker.message import Message
from streams.worker.reply_topics import ReplyTopics
from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import DeadLetter, ErrorInfo, InferenceRequest, InferenceResult, Status
from topics.names import Topics
from topics.seal import Sealer

log = logging.getLogger(__name__)


INTERNAL_REPLY = "internal error: the request was dead-lettered for the operators"


@dataclass
class Answers:
    """What every stage sends: results (to the caller's reply topic and, sealed, to the results
    topic), refusals, dead letters, and sealed events on internal topics."""

    settings: Settings
    topics: Topics
    store: ObjectStore
    sealer: Sealer
    reply_topics: ReplyTopics

    async def put_sealed(self, outbox: Outbox, topic: str, key: bytes | None, value: bytes, span: Span,
                          claims: dict[str, str | None], headers: Headers | None = None) -> None:
        """Send an event to an internal topic: the trace context, the seal, nothing of the caller's."""
        sealed = [*tracing.with_trace(headers or [], span), self.sealer.seal(topic, key, value, claims)]
        await outbox.put(topic, key, value, sealed)

    def open_seal(self, msg: Message) -> dict[str, Any]:
        """The claims of an event on an internal topic; SealError unless the product wrote it."""
        return self.sealer.open(msg.topic, msg.key, msg.value, msg.headers)

    async def emit_result(
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
            await self.put_sealed(outbox, self.topics.results, key, value, span, {"rid": result.request_id}, headers)

    def reply_topic(self, request: InferenceRequest) -> str | None:
        """Where an admitted request is answered: its reply_to (checked at the intake), else the
        default replies topic; None for copies no caller waits for."""
        return (request.reply_to or self.topics.replies) if _answers_caller(request) else None

    async def answer_again(self, outbox: Outbox, request: InferenceRequest, stored: asyncpg.Record,
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
        await self.emit_result(outbox, result, outputs, self.reply_topic(request), span, store=False)
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
        await self.emit_result(outbox, result, None, self.reply_topic(request), span, store=store)

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
            reply_topic = self.reply_topic(request)
        await self.emit_result(outbox, result, None, reply_topic, span)

    async def dead_letter_bare(self, outbox: Outbox, msg: Message, error: EventError) -> None:
        """A dead letter with the event's place and reason only: the last resort when the full
        one cannot be written. The original stays in its topic until retention removes it."""
        letter = DeadLetter(
            reason=error.code, message=bounded(f"{error.message} (original not kept: see the source topic)"),
            source_topic=msg.topic, source_partition=msg.partition, source_offset=msg.offset,
        )
        await outbox.put(self.topics.deadletter, None, events.encode_dead_letter(letter), [])


def _answers_caller(request: InferenceRequest) -> bool:
    """Shadow and replayed copies only store their results: no caller waits for them."""
    return request.shadow_of is None and request.replay_of is None
