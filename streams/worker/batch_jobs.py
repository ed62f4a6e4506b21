"""Batch jobs: an input in S3 (a JSONL of requests, or a prefix of images) fanned out as request
events at a controlled rate, then collected into one JSONL output object in S3.

Restart-safe without writing anything twice: item i of batch B is always request `B-<i>`, the
publish cursor is checkpointed in PostgreSQL after the broker confirmed the items before it, and
the output is built from the results table, which holds one row per request id. A worker that
dies mid-batch leaves the command unacknowledged; the next worker resumes from the checkpoint
(re-publishing at most one checkpoint interval, which only rewrites the same rows).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from streams.kafka.outbox import Outbox
from streams.registry.records import ModelRegistry
from streams.serving.oip import Limits, tensor_json
from streams.settings import Settings
from streams.storage.batch_inputs import Item, list_items
from streams.storage.jobs import Batch, BatchStatus, JobStore
from streams.storage.objects import ObjectStore
from streams.storage.results import ResultsStore
from streams.telemetry import tracing
from streams.worker.answers import Answers
from streams.worker.message import Message
from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import ErrorInfo, InferenceRequest, InferenceResult, Status
from topics.names import Topics
from topics.seal import Sealer, SealError

log = logging.getLogger(__name__)
CHECKPOINT_EVERY = 50


def item_request_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index:07d}"


class BatchRunner:
    """Runs one batch to the end (used by the batch agent of a worker)."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store: ObjectStore, jobs: JobStore,
                 results: ResultsStore) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.registry = registry
        self.store = store
        self.jobs = jobs
        self.results = results
        self.sealer = Sealer(settings.cluster_secret)
        self.limits = Limits(settings.bridge_max_elements, settings.bridge_max_json_depth)

    async def run(self, batch_id: str, owner: dict[str, Any] | None, outbox: Outbox) -> None:
        """`owner`: the submitter's principal claims, vouched for on every item so the intake
        admits (and counts) them as the submitter's requests."""
        batch = await self.jobs.batch(batch_id)
        if batch is None or batch.status in BatchStatus.FINAL:
            return
        try:
            model = self.registry.resolve(batch.model, batch.version)
            items = await asyncio.to_thread(list_items, self.store, batch.input, model, self.limits)
        except EventError as exc:
            await self.jobs.update_batch(batch_id, status=BatchStatus.FAILED, error=exc.message)
            return
        await self.jobs.update_batch(batch_id, status=BatchStatus.RUNNING, total=len(items))
        await self._publish(batch, owner, items, outbox)
        await self._collect(batch, len(items))

    async def _publish(self, batch: Batch, owner: dict[str, Any] | None, items: list[Item], outbox: Outbox) -> None:
        interval = 1.0 / batch.rate if batch.rate > 0 else 0.0
        started, sent = time.monotonic(), 0
        for index in range(batch.published, len(items)):
            await self._publish_item(batch, owner, index, items[index], outbox)
            sent += 1
            if (index + 1) % CHECKPOINT_EVERY == 0 or index + 1 == len(items):
                await outbox.flush()  # confirmed by the broker before the cursor moves past them
                await self.jobs.update_batch(batch.batch_id, published=index + 1)
            ahead = started + sent * interval - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def _publish_item(
        self, batch: Batch, owner: dict[str, Any] | None, index: int, item: Item, outbox: Outbox
    ) -> None:
        request = InferenceRequest(
            request_id=item_request_id(batch.batch_id, index), model=batch.model, version=batch.version,
            correlation_id=item.item_id, batch_id=batch.batch_id,
        )
        key = request.request_id.encode()
        try:
            inputs = await asyncio.to_thread(item.load)
        except EventError as exc:
            # A bad item is answered (as an error) right here, so the batch still completes.
            result = InferenceResult(
                request_id=request.request_id, correlation_id=item.item_id, model=batch.model,
                status=Status.ERROR, error=ErrorInfo(code=exc.code, message=exc.message), batch_id=batch.batch_id,
            )
            value = events.encode_result(result)
            seal = self.sealer.seal(self.topics.results, key, value, {"rid": request.request_id})
            await outbox.put(self.topics.results, key, value, [seal])
            return
        if sum(a.nbytes for a in inputs.values()) > self.settings.claim_check_bytes:
            request.inputs_ref = await self.store.aput(
                f"requests/{request.request_id}.bin", events.encode_bundle(inputs)
            )
            inputs = {}
        value = events.encode_request(request, inputs)
        vouched = [self.sealer.seal(self.topics.requests, key, value, {"rid": request.request_id, "admission": owner})]
        await outbox.put(self.topics.requests, key, value, vouched if owner is not None else None)

    async def _collect(self, batch: Batch, total: int) -> None:
        item_ids = [item_request_id(batch.batch_id, index) for index in range(total)]
        rows = await self.results.wait_until_stored(item_ids, timeout_s=self.settings.batch_timeout_s)
        status = BatchStatus.COMPLETED if len(rows) == total else BatchStatus.INCOMPLETE
        output = b"".join(orjson.dumps(_output_line(batch.batch_id, rows[rid])) + b"\n" for rid in sorted(rows))
        uri = await self.store.aput(f"batches/{batch.batch_id}/output.jsonl", output)
        await self.jobs.update_batch(batch.batch_id, status=status, output_ref=uri)


def _output_line(batch_id: str, row) -> dict:
    line = {
        "index": int(row["request_id"][len(batch_id) + 1 :]),
        "id": row["correlation_id"],
        "request_id": row["request_id"],
        "status": row["status"],
    }
    if row["status"] != "ok":
        line["error"] = {"code": row["error_code"], "message": row["error_message"]}
    elif row["outputs_ref"]:
        line["outputs_ref"] = row["outputs_ref"]
    elif row["outputs"]:
        _, tensors = events.decode_bundle(row["outputs"])
        line["outputs"] = [tensor_json(name, array) for name, array in tensors.items()]
    return line


@dataclass
class BatchJobs:
    """The batch stage: batch job commands, which only the product writes."""

    settings: Settings
    registry: ModelRegistry
    store: ObjectStore
    results: ResultsStore
    answers: Answers

    def batch_command(self, msg: Message) -> tuple[str, dict[str, Any] | None]:
        """The batch id of a batch job command, which only the product writes, and the claims of
        the principal who submitted it (sealed onto each of its items)."""
        try:
            claims = self.answers.open_seal(msg)
        except SealError as exc:
            raise EventError(ErrorCode.UNAUTHENTICATED, f"batch command not written by the product ({exc})") from None
        batch_id = claims.get("batch")
        if not isinstance(batch_id, str) or not batch_id:
            raise EventError(ErrorCode.INVALID_SCHEMA, "batch command without a batch id")
        return batch_id, claims.get("admission")

    async def step(self, messages: Sequence[Message], outbox: Outbox) -> None:
        """Batch job commands: each batch runs to its end (its output written) before the next."""
        runner = BatchRunner(self.settings, self.registry, self.store, JobStore(self.results.pool), self.results)
        for message in messages:
            try:
                batch_id, owner = self.batch_command(message)
            except EventError as error:
                span = tracing.start_span("batches", message.headers)
                await self.answers.reject(outbox, message, error, None, "batches", span, answer=False)
                span.end()
                continue
            await runner.run(batch_id, owner, outbox)
        await outbox.flush()
