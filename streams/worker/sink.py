"""The results sink stage."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.trace import Span

from streams.kafka.outbox import Outbox
from streams.storage.results import ResultsStore, StoredResult
from streams.telemetry import tracing
from streams.telemetry.logs import log_request
from streams.telemetry.metrics import LATENCY, REQUESTS
from streams.worker.answers import Answers
from streams.worker.failures import as_event_error
from streams.worker.message import Message
from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import InferenceResult
from topics.seal import SealError

log = logging.getLogger(__name__)


@dataclass
class Sink:
    """The results sink: the results topic into PostgreSQL."""

    results: ResultsStore
    answers: Answers

    async def step(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Upsert a batch of results into PostgreSQL."""
        rows: list[StoredResult] = []
        stored: list[tuple[Message, InferenceResult, Span]] = []
        try:
            for msg in messages:
                span = tracing.start_span("sink", msg.headers)
                try:
                    claims = self.answers.open_seal(msg)
                    result, outputs = events.decode_result_to_store(msg.value)
                    if claims.get("rid") != result.request_id:
                        raise SealError("the seal's claims do not match the result")
                except SealError as exc:
                    error = EventError(ErrorCode.UNAUTHENTICATED, f"not written by the product ({exc})")
                    await self.answers.reject(outbox, msg, error, None, "sink", span, answer=False)
                    span.end()
                    continue
                except Exception as exc:  # noqa: BLE001 - classified: an outage retries the chunk
                    await self.answers.reject(outbox, msg, as_event_error(exc), None, "sink", span, answer=False)
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
