"""`/v1/jobs` and `/v1/batches`: work that should not hold a connection open. A job is one
request whose result lands in PostgreSQL; a batch is an S3 input the worker publishes item by
item. Each is read back only by its tenant (or an admin)."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from streams.bridge.openapi import CALLER, CREDENTIAL_ERRORS, REQUEST_ERRORS, UNKNOWN, Endpoint
from streams.bridge.requests import REQUEST_ID, SPAN, credentials, dumps, json_object
from streams.client import UpstreamUnavailable
from streams.gate.auth import Principal, principal_claims
from streams.registry.routing import check_inputs
from streams.serving.oip import parse_infer_request, tensor_json
from streams.storage.batch_inputs import list_items
from streams.storage.objects import parse_uri
from streams.telemetry import tracing
from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import InferenceRequest
from topics.seal import Sealer

if TYPE_CHECKING:
    from streams.bridge.app import Bridge


async def create_job(bridge: Bridge, request: web.Request) -> web.Response:
    caller = await bridge.caller(request)
    body = await json_object(request)
    model_name, version = body.get("model"), body.get("version")
    if not isinstance(model_name, str) or not isinstance(version, str | None):
        raise EventError(ErrorCode.INVALID_REQUEST, "a job needs a 'model' (and may name a 'version'), as strings")
    info = bridge.registry.resolve(model_name, version)
    inputs = parse_infer_request(orjson.dumps({"inputs": body.get("inputs")}), None, bridge.limits).inputs
    check_inputs(info, inputs)
    # The worker checks the credentials again and counts the job against the tenant's limit.
    job = InferenceRequest(request_id=events.new_request_id(), model=info.name, version=version,
                           credentials=credentials(request))
    request[REQUEST_ID] = job.request_id
    await bridge.stores.jobs.add_job(job.request_id, info.name, job.version, caller.tenant)
    try:
        # No correlation id: nobody waits; the result lands in PostgreSQL.
        await bridge.client.send(job, inputs, delivered=True, headers=tracing.with_trace([], request[SPAN]))
    except UpstreamUnavailable as exc:
        raise EventError(ErrorCode.UNAVAILABLE, str(exc)) from None
    return web.json_response({"job_id": job.request_id, "status": "pending",
                              "href": f"/v1/jobs/{job.request_id}"}, status=202)


async def get_job(bridge: Bridge, request: web.Request) -> web.Response:
    caller = await bridge.caller(request)
    job_id = request.match_info["job_id"]
    if not _owns(caller, await bridge.stores.jobs.job_tenant(job_id)):
        raise EventError(ErrorCode.NOT_FOUND, f"no job {job_id}")  # the same whether it exists or not
    row = await bridge.db.get(job_id)
    if row is None:
        return web.json_response({"job_id": job_id, "status": "pending"})
    answer = {"job_id": job_id, "model": row["model"], "model_version": row["model_version"],
              "timings_ms": orjson.loads(row["timings_ms"])}
    if row["status"] != "ok":
        answer |= {"status": "failed", "error": {"code": row["error_code"], "message": row["error_message"]}}
    elif row["outputs_ref"]:
        answer |= {"status": "completed", "outputs_ref": row["outputs_ref"],
                   "outputs_url": bridge.client.store.presigned_get(row["outputs_ref"])}
    else:
        _, tensors = events.decode_bundle(row["outputs"])
        answer |= {"status": "completed", "outputs": [tensor_json(n, a) for n, a in tensors.items()]}
    return web.json_response(answer, dumps=dumps)


async def create_batch(bridge: Bridge, request: web.Request) -> web.Response:
    caller = await bridge.caller(request)
    body = await json_object(request)
    model_name, input_uri, version = body.get("model"), body.get("input"), body.get("version")
    if not isinstance(model_name, str) or not isinstance(input_uri, str) or not isinstance(version, str | None):
        raise EventError(ErrorCode.INVALID_REQUEST, "a batch needs a 'model' and an 'input' (s3://bucket/key.jsonl"
                         " or s3://bucket/prefix/), and may name a 'version', as strings")
    settings = bridge.settings
    rate = body.get("rate", settings.batch_rate)
    if not isinstance(rate, (int, float)) or not 0 < rate <= 100_000:
        raise EventError(ErrorCode.INVALID_REQUEST, "'rate' is items per second in (0, 100000]")
    info = bridge.registry.resolve(model_name, version)
    parse_uri(input_uri)
    items = await asyncio.to_thread(list_items, bridge.client.store, input_uri, info, bridge.limits)
    if not items:
        raise EventError(ErrorCode.INVALID_REQUEST, f"no items in {input_uri}")
    if len(items) > settings.batch_max_items:
        raise EventError(ErrorCode.PAYLOAD_TOO_LARGE, f"{len(items)} items; the limit is {settings.batch_max_items}")
    batch_id = "b" + uuid.uuid4().hex
    await bridge.stores.jobs.add_batch(batch_id, info.name, version, input_uri, float(rate), len(items), caller.tenant)
    try:
        topic, key, value = bridge.client.topics.batches, batch_id.encode(), orjson.dumps({"batch_id": batch_id})
        claims = {"batch": batch_id, "admission": principal_claims(caller)}
        seal = Sealer(settings.cluster_secret).seal(topic, key, value, claims)
        await bridge.client.produce(topic, key, value, headers=[seal])
    except UpstreamUnavailable as exc:
        raise EventError(ErrorCode.UNAVAILABLE, str(exc)) from None
    return web.json_response({"batch_id": batch_id, "status": "pending", "total": len(items),
                              "href": f"/v1/batches/{batch_id}"}, status=202)


async def get_batch(bridge: Bridge, request: web.Request) -> web.Response:
    caller = await bridge.caller(request)
    batch_id = request.match_info["batch_id"]
    batch = await bridge.stores.jobs.batch(batch_id)
    if batch is None or not _owns(caller, batch.tenant):
        raise EventError(ErrorCode.NOT_FOUND, f"no batch {batch_id}")  # the same whether it exists or not
    done, failed = await bridge.db.batch_progress(batch_id)
    answer = {"batch_id": batch_id, "model": batch.model, "status": batch.status, "total": batch.total,
              "published": batch.published, "done": done, "failed": failed, "error": batch.error}
    if batch.output_ref:
        answer |= {"output": batch.output_ref, "output_url": bridge.client.store.presigned_get(batch.output_ref)}
    return web.json_response(answer)


def _owns(caller: Principal, tenant: str | None) -> bool:
    """Whether the caller may read what `tenant` submitted: its own tenant, or an admin."""
    return tenant is not None and (caller.tenant == tenant or caller.is_admin)


ROUTES = [
    Endpoint("POST", "/v1/jobs", create_job, "Submit an inference job; answers 202 with its id", ok=202,
             body="JobRequest", headers=CALLER,
             errors=(*REQUEST_ERRORS, *CREDENTIAL_ERRORS, *UNKNOWN, ErrorCode.INVALID_TENSOR, ErrorCode.UNAVAILABLE)),
    Endpoint("GET", "/v1/jobs/{job_id}", get_job, "Job status and result", headers=CALLER,
             errors=(*CREDENTIAL_ERRORS, ErrorCode.NOT_FOUND)),
    Endpoint("POST", "/v1/batches", create_batch, "Submit a batch job over an S3 input; answers 202", ok=202,
             body="BatchRequest", headers=CALLER,
             errors=(*REQUEST_ERRORS, *CREDENTIAL_ERRORS, *UNKNOWN, ErrorCode.INVALID_SCHEMA, ErrorCode.INVALID_TENSOR,
                     ErrorCode.PAYLOAD_UNAVAILABLE, ErrorCode.UNAVAILABLE)),
    Endpoint("GET", "/v1/batches/{batch_id}", get_batch, "Batch progress and output", headers=CALLER,
             errors=(*CREDENTIAL_ERRORS, ErrorCode.NOT_FOUND)),
]
