"""The HTTP bridge: turns HTTP calls into request events and waits for their replies. It holds
no model and runs no inference.

- Open Inference Protocol (KServe v2 / Triton HTTP, with the binary tensor extension), so
  `tritonclient.http` works against it unchanged.
- `/v1/models/{model}/classify`: an image in, top-k labels out.
- `/v1/jobs` and `/v1/batches`: work that should not hold a connection open; results come from
  PostgreSQL and S3.

Each bridge instance reads replies from a reply topic of its own, by partition assignment, so
several instances behind a load balancer never see each other's replies.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import numpy as np
import orjson
import redis.asyncio as aioredis
from aiohttp import BodyPartReader, web
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry.trace import SpanKind
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from pydantic import ValidationError
from redis.exceptions import RedisError

from streams.bridge.openapi import CALLER, CREDENTIAL_ERRORS, REQUEST_ERRORS, Route, openapi_document
from streams.client import InferenceClient, ReplyTimeout, UpstreamUnavailable
from streams.gate.auth import ADMIN_SCOPE, ANONYMOUS, ApiKeyStore, Authenticator, Principal, principal_claims
from streams.gate.gatekeeper import jwt_verifier
from streams.kafka.admin import ensure_topics
from streams.registry.records import ModelInfo, ModelRegistry
from streams.registry.routing import check_inputs
from streams.registry.store import (
    RegistryError,
    RegistryFollower,
    RegistryStore,
    info_from_artifact,
)
from streams.serving.images import ImageError, load_labels, probabilities, top_k
from streams.serving.oip import (
    InferBody,
    Limits,
    ProtocolError,
    build_infer_response,
    model_config,
    model_metadata,
    parse_infer_request,
    repository_index,
    tensor_json,
    unsupported_message,
)
from streams.settings import Settings
from streams.storage.batch_inputs import list_items
from streams.storage.jobs import JobStore
from streams.storage.objects import parse_uri
from streams.storage.results import ResultsStore
from streams.storage.schema import migrate
from streams.telemetry import model_stats, tracing
from streams.telemetry import presence as heartbeats
from streams.telemetry.logs import log_request, setup_logging
from streams.telemetry.presence import served
from topics import events
from topics.errors import HTTP_STATUS, ErrorCode, EventError
from topics.events import Credentials, InferenceRequest, Result
from topics.names import Topics, TopicSpec
from topics.seal import Sealer

log = logging.getLogger(__name__)

# Probes and scrapes: counted in the metrics, not logged line by line.
QUIET_ROUTES = {"/metrics", "/v2/health/live", "/v2/health/ready"}
# Request-scoped values: the request's trace span, and the id of the event it produced.
SPAN = "inferstream_span"
REQUEST_ID = "inferstream_request_id"
HEADER_LENGTH = "Inference-Header-Content-Length"
TIMEOUT_HEADER = "X-Inferstream-Timeout"  # seconds; the request's deadline
REDIS_READ_TIMEOUT_S = 2.0  # heartbeats and statistics: a slow Redis is an unavailable one


def error(code: ErrorCode, message: str) -> web.Response:
    """Every error is JSON: a stable code and a message (`error` is what tritonclient shows)."""
    return web.json_response({"error": message, "code": code.value}, status=HTTP_STATUS[code], dumps=_dumps)


def _dumps(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


# aiohttp's own refusals, in the bridge's vocabulary.
ROUTING_ERRORS = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 413: ErrorCode.PAYLOAD_TOO_LARGE}


# What a request for inference may be answered, through the worker or at the edge.
INFERENCE = (
    ErrorCode.INVALID_REQUEST, ErrorCode.INVALID_TENSOR, ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN,
    ErrorCode.UNKNOWN_MODEL, ErrorCode.UNKNOWN_VERSION, ErrorCode.DUPLICATE_REQUEST, ErrorCode.PAYLOAD_UNAVAILABLE,
    ErrorCode.RATE_LIMITED, ErrorCode.INFERENCE_FAILED, ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED,
)
UNKNOWN = (ErrorCode.UNKNOWN_MODEL, ErrorCode.UNKNOWN_VERSION)
ROUTES = [
    Route("GET", "/v2/health/live", "live", "Liveness"),
    Route("GET", "/v2/health/ready", "ready", "Readiness: the broker takes requests and a worker of the group is live",
          errors=(ErrorCode.UNAVAILABLE,)),
    Route("GET", "/v2", "server_metadata", "Server metadata"),
    # Before /v2/models/{model}, which would take "stats" for a model name.
    Route("GET", "/v2/models/stats", "model_stats", "Inference statistics of every version (Triton's format)",
          errors=(ErrorCode.UNAVAILABLE,)),
    Route("GET", "/v2/models/{model}", "model_metadata", "Model metadata (newest version)", errors=UNKNOWN),
    Route("GET", "/v2/models/{model}/versions/{version}", "model_metadata", "Model metadata", errors=UNKNOWN),
    Route("GET", "/v2/models/{model}/ready", "model_ready",
          "Model readiness: a live worker serves every version unversioned requests reach",
          errors=(*UNKNOWN, ErrorCode.UNAVAILABLE)),
    Route("GET", "/v2/models/{model}/versions/{version}/ready", "model_ready",
          "Model version readiness: a live worker serves the version", errors=(*UNKNOWN, ErrorCode.UNAVAILABLE)),
    Route("GET", "/v2/models/{model}/config", "model_config", "Model configuration (Triton's JSON form)",
          errors=UNKNOWN),
    Route("GET", "/v2/models/{model}/versions/{version}/config", "model_config", "Model version configuration",
          errors=UNKNOWN),
    Route("GET", "/v2/models/{model}/stats", "model_stats", "Inference statistics of a model's versions",
          errors=(*UNKNOWN, ErrorCode.UNAVAILABLE)),
    Route("GET", "/v2/models/{model}/versions/{version}/stats", "model_stats", "Inference statistics of a version",
          errors=(*UNKNOWN, ErrorCode.UNAVAILABLE)),
    Route("POST", "/v2/repository/index", "repository_index",
          "Registered versions, READY where a live worker serves them (body: optional {\"ready\": bool})",
          body="RepositoryIndexRequest", errors=(ErrorCode.INVALID_REQUEST, ErrorCode.UNAVAILABLE)),
    *(Route(method, path, "unsupported", f"Not supported: answers {ErrorCode.UNSUPPORTED.value}",
            errors=(ErrorCode.UNSUPPORTED,)) for method, path in (
        ("POST", "/v2/repository/models/{model}/load"),
        ("POST", "/v2/repository/models/{model}/unload"),
        ("GET", "/v2/logging"),
        ("POST", "/v2/logging"),
        ("GET", "/v2/trace/setting"),
        ("POST", "/v2/trace/setting"),
        ("GET", "/v2/models/{model}/trace/setting"),
        ("POST", "/v2/models/{model}/trace/setting"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("GET", "/v2/systemsharedmemory/region/{region}/status"),
        ("POST", "/v2/systemsharedmemory/region/{region}/register"),
        ("POST", "/v2/systemsharedmemory/region/{region}/unregister"),
        ("POST", "/v2/systemsharedmemory/unregister"),
        ("GET", "/v2/cudasharedmemory/status"),
        ("GET", "/v2/cudasharedmemory/region/{region}/status"),
        ("POST", "/v2/cudasharedmemory/region/{region}/register"),
        ("POST", "/v2/cudasharedmemory/region/{region}/unregister"),
        ("POST", "/v2/cudasharedmemory/unregister"),
    )),
    *(Route("POST", path, "infer", summary, body="InferRequest", headers=(*CALLER, TIMEOUT_HEADER, HEADER_LENGTH),
            errors=INFERENCE, answers="infer") for path, summary in (
        ("/v2/models/{model}/infer", "Inference (Open Inference Protocol, binary tensors too)"),
        ("/v2/models/{model}/versions/{version}/infer", "Inference on a version"))),
    Route("POST", "/v1/models/{model}/classify", "classify", "Classify an image (raw bytes or multipart 'image')",
          body="image", query=("top_k",), headers=(*CALLER, TIMEOUT_HEADER),
          errors=(*INFERENCE, ErrorCode.INVALID_IMAGE)),
    Route("POST", "/v1/jobs", "create_job", "Submit an inference job; answers 202 with its id", ok=202,
          body="JobRequest", headers=CALLER,
          errors=(*REQUEST_ERRORS, *CREDENTIAL_ERRORS, *UNKNOWN, ErrorCode.INVALID_TENSOR, ErrorCode.UNAVAILABLE)),
    Route("GET", "/v1/jobs/{job_id}", "get_job", "Job status and result", headers=CALLER,
          errors=(*CREDENTIAL_ERRORS, ErrorCode.NOT_FOUND)),
    Route("POST", "/v1/batches", "create_batch", "Submit a batch job over an S3 input; answers 202", ok=202,
          body="BatchRequest", headers=CALLER,
          errors=(*REQUEST_ERRORS, *CREDENTIAL_ERRORS, *UNKNOWN, ErrorCode.INVALID_SCHEMA, ErrorCode.INVALID_TENSOR,
                  ErrorCode.PAYLOAD_UNAVAILABLE, ErrorCode.UNAVAILABLE)),
    Route("GET", "/v1/batches/{batch_id}", "get_batch", "Batch progress and output", headers=CALLER,
          errors=(*CREDENTIAL_ERRORS, ErrorCode.NOT_FOUND)),
    Route("GET", "/v1/models", "list_models", "Registered models and versions"),
    Route("POST", "/v1/models", "register_model",
          "Register a model version (validated: the artifact must load and match); needs the admin scope",
          ok=201, body="ModelRegistration", headers=CALLER,
          errors=(*REQUEST_ERRORS, *CREDENTIAL_ERRORS, ErrorCode.INVALID_MODEL)),
    Route("PATCH", "/v1/models/{model}/versions/{version}", "update_model",
          "Change weight, status, shadow, batching or backends; needs the admin scope", body="ModelChange",
          headers=CALLER, errors=(*REQUEST_ERRORS, *CREDENTIAL_ERRORS, ErrorCode.UNKNOWN_VERSION,
                                  ErrorCode.INVALID_MODEL)),
    Route("DELETE", "/v1/models/{model}/versions/{version}", "retire_model",
          "Retire a version; needs the admin scope", headers=CALLER,
          errors=(*CREDENTIAL_ERRORS, ErrorCode.UNKNOWN_VERSION)),
    Route("GET", "/openapi.json", "openapi", "This document"),
    Route("GET", "/metrics", "metrics", "Prometheus metrics", answers="text/plain"),
]


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry()  # kept current by the follower
        self.follower = RegistryFollower(settings, self.registry)
        self.instance = settings.bridge_instance or uuid.uuid4().hex[:12]
        self.client = InferenceClient(settings, reply_topic=Topics(settings.topic_prefix).bridge_replies(self.instance))
        self.db = ResultsStore(settings.postgres_dsn)
        self.limits = Limits(settings.bridge_max_elements, settings.bridge_max_json_depth)
        self.prometheus = CollectorRegistry()
        self.requests = Counter("inferstream_bridge_requests", "HTTP requests", ["route", "status"],
                                registry=self.prometheus)
        self.latency = Histogram("inferstream_bridge_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.prometheus,
                                 buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
        Gauge("inferstream_bridge_pending_replies", "requests waiting for their reply",
              registry=self.prometheus).set_function(lambda: self.client.pending)
        self.prometheus.register(_ReplyCounters(self.client))

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        own = TopicSpec(self.client.reply_topic, self.settings.reply_partitions, self.settings.reply_retention_ms)
        await ensure_topics(self.settings, [], extra=[own])
        await self.follower.start()
        await self.client.start()
        await migrate(self.settings.postgres_dsn)
        await self.db.start()
        self.jobs = JobStore(self.db.pool)
        self.redis = aioredis.from_url(self.settings.redis_url)
        self.models = RegistryStore(self.settings, self.db.pool, self.redis)
        keys = ApiKeyStore(self.db.pool, self.redis, self.settings.api_key_pepper,
                           self.settings.api_key_cache_ttl_s, key_prefix=self.settings.topic_prefix)
        self.authenticator = Authenticator(jwt_verifier(self.settings), keys, self.settings.auth_required)
        log.info("bridge %s reads replies from %s", self.instance, self.client.reply_topic)

    async def stop(self) -> None:
        await self.follower.stop()
        await self.client.stop()
        await self.redis.aclose()
        await self.db.stop()
        if not self.settings.bridge_instance:  # a random instance's topic is never read again
            admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
            await admin.start()
            try:
                await admin.delete_topics([self.client.reply_topic])
            except Exception as exc:  # noqa: BLE001 - leaving the topic behind is harmless
                log.warning("could not delete %s: %r", self.client.reply_topic, exc)
            finally:
                await admin.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.bridge_max_body_bytes, middlewares=[self._errors])
        for route in ROUTES:
            app.router.add_route(route.method, route.path, getattr(self, route.handler), name=None)
        app.on_startup.append(lambda _: self.start())
        app.on_cleanup.append(lambda _: self.stop())
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        started = time.perf_counter()
        # The caller's trace (W3C traceparent) or a new one; it travels on in the Kafka headers.
        span = tracing.start_span(f"{request.method} {route}", request.headers, kind=SpanKind.SERVER,
                                  **{"http.method": request.method, "http.route": route})
        request[SPAN] = span
        try:
            response = await self._respond(request, handler)
            elapsed = time.perf_counter() - started
            self.latency.labels(route).observe(elapsed)
            self.requests.labels(route, str(response.status)).inc()
            response.headers.update(tracing.trace_headers(span))
            span.set_attribute("http.status_code", response.status)
            if response.status >= 500:
                tracing.fail(span, str(response.status), "server error")
            if route not in QUIET_ROUTES:
                log_request(span, "bridge", "answered", request.get(REQUEST_ID), method=request.method,
                            route=route, status=response.status, ms=round(elapsed * 1000, 3))
            return response
        finally:
            span.end()

    async def _respond(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """The handler's response, or the JSON error response for what it raised."""
        try:
            return await handler(request)
        except EventError as exc:
            return error(exc.code, exc.message)
        except ProtocolError as exc:
            return error(ErrorCode.INVALID_REQUEST, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return error(ErrorCode.PAYLOAD_TOO_LARGE, f"request body over {self.settings.bridge_max_body_bytes} bytes")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error(ROUTING_ERRORS.get(exc.status, ErrorCode.INVALID_REQUEST), exc.reason)
        except Exception:  # noqa: BLE001 - logged here; the caller gets no stack trace
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error(ErrorCode.INTERNAL, "internal error")

    # -- the request/reply core -------------------------------------------------------------

    def _model(self, request: web.Request) -> ModelInfo:
        return self.registry.resolve(request.match_info["model"], request.match_info.get("version"))

    def _timeout(self, request: web.Request) -> float:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self.settings.bridge_timeout_s
        try:
            value = float(raw)
        except ValueError:
            value = -1
        if not 0 < value <= 3600:
            raise EventError(ErrorCode.INVALID_REQUEST, f"{TIMEOUT_HEADER} must be seconds in (0, 3600]")
        return value

    def _new_request(
        self, request: web.Request, info: ModelInfo, pinned_version: str | None, **fields
    ) -> InferenceRequest:
        return self.client.request(
            info.name, {}, version=pinned_version, timeout=self._timeout(request),
            credentials=_credentials(request), **fields,
        )

    async def _call(self, request: web.Request, info: ModelInfo, inputs: dict[str, np.ndarray],
                    request_id: str | None = None) -> tuple[Result, dict[str, np.ndarray]]:
        check_inputs(info, inputs)  # refuse at the edge what the worker would refuse
        event = self._new_request(request, info, request.match_info.get("version"))
        if request_id:
            event.parameters["client_request_id"] = request_id
        request[REQUEST_ID] = event.request_id
        try:
            waiter = await self.client.send(event, inputs, headers=tracing.with_trace([], request[SPAN]))
            result = await self.client.wait(event, waiter)
        except UpstreamUnavailable as exc:
            raise EventError(ErrorCode.UNAVAILABLE, str(exc)) from None
        except ReplyTimeout as exc:
            raise EventError(ErrorCode.DEADLINE_EXCEEDED, str(exc)) from None
        if result.header.error:
            raise EventError(result.header.error.code, result.header.error.message)
        outputs = await self.client.outputs(result)
        return result, outputs

    # -- Open Inference Protocol ------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        if not await self.client.broker_ready():
            return error(ErrorCode.UNAVAILABLE, "the broker is not reachable")
        workers = await self._live_workers()
        if not workers:
            raise EventError(ErrorCode.UNAVAILABLE, f"no worker of group {self.settings.app_id!r} is live: none has "
                             f"sent a heartbeat in the last {self._heartbeat_ttl_s:g} s")
        return web.json_response({"ready": True, "workers": len(workers)})

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "inferstream", "version": "0.1.0", "extensions": ["binary_tensor_data"]})

    async def model_metadata(self, request: web.Request) -> web.Response:
        info = self._model(request)
        return web.json_response(model_metadata(info, self.registry.versions(info.name)))

    async def model_ready(self, request: web.Request) -> web.Response:
        info = self._model(request)
        wanted = {info.key} if "version" in request.match_info else {i.key for i in self.registry.routable(info.name)}
        missing = sorted(wanted - served(await self._live_workers()))
        if missing:
            raise EventError(ErrorCode.UNAVAILABLE, f"not ready: no live worker serves {', '.join(missing)}")
        return web.json_response({"name": info.name, "ready": True})

    async def model_config(self, request: web.Request) -> web.Response:
        info = self._model(request)
        delay = self.settings.max_batch_delay_ms if info.max_batch_delay_ms is None else info.max_batch_delay_ms
        return web.json_response(model_config(info, delay))

    async def model_stats(self, request: web.Request) -> web.Response:
        if "model" not in request.match_info:
            versions = [(i.name, i.version) for i in self.registry.all() if i.status != "retired"]
        elif "version" in request.match_info:
            info = self._model(request)
            versions = [(info.name, info.version)]
        else:
            name = self._model(request).name
            versions = [(name, v) for v in self.registry.versions(name)]
        try:
            stats = await asyncio.wait_for(model_stats.read(self.redis, self.settings.topic_prefix, versions),
                                           REDIS_READ_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError):
            raise EventError(ErrorCode.UNAVAILABLE, "statistics cannot be read: Redis is unavailable") from None
        return web.json_response({"model_stats": stats})

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await _json_object(request) if (await request.read()).strip() else {}
        ready_only = body.get("ready", False)
        if not isinstance(ready_only, bool):
            raise EventError(ErrorCode.INVALID_REQUEST, "'ready' must be a boolean")
        live = served(await self._live_workers())
        return web.json_response(repository_index(self.registry.all(), live, ready_only))

    async def unsupported(self, request: web.Request) -> web.Response:
        raise EventError(ErrorCode.UNSUPPORTED, unsupported_message(request.path))

    @property
    def _heartbeat_ttl_s(self) -> float:
        return self.settings.heartbeat_interval_s * heartbeats.TTL_INTERVALS

    async def _live_workers(self) -> list[heartbeats.WorkerBeat]:
        try:
            return await asyncio.wait_for(
                heartbeats.live_workers(self.redis, self.settings.topic_prefix, self.settings.app_id),
                REDIS_READ_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError):
            raise EventError(ErrorCode.UNAVAILABLE, "worker heartbeats cannot be read: Redis is unavailable") from None

    async def infer(self, request: web.Request) -> web.Response:
        info = self._model(request)
        header_length = request.headers.get(HEADER_LENGTH)
        try:
            length = int(header_length) if header_length is not None else None
        except ValueError:
            raise EventError(ErrorCode.INVALID_REQUEST, f"{HEADER_LENGTH} must be an integer") from None
        body: InferBody = parse_infer_request(await request.read(), length, self.limits)
        result, outputs = await self._call(request, info, body.inputs, body.id)
        payload, json_length = build_infer_response(
            info.name, result.header.model_version or info.version, body.id, outputs, body
        )
        content_type = "application/octet-stream" if json_length else "application/json"
        response = web.Response(body=payload, content_type=content_type)
        if json_length is not None:
            response.headers[HEADER_LENGTH] = str(json_length)
        return response

    # -- images -----------------------------------------------------------------------------

    async def classify(self, request: web.Request) -> web.Response:
        info = self._model(request)
        labels = load_labels(info.model_dir, info.model_dump())
        if not info.preprocessing or not labels:
            raise EventError(ErrorCode.INVALID_REQUEST, f"model {info.name} does not classify images")
        k = _int_param(request, "top_k", 5, 1, len(labels))
        data = await _image_bytes(request)
        try:
            # The file as it came where the model takes it (the worker decodes it with its batch,
            # check_inputs refuses a bad header here), else decoded here, off the event loop.
            inputs = (info.image_file_inputs(data) if info.image_forms and info.image_forms.encoded
                      else await asyncio.to_thread(info.image_file_inputs, data))
        except ImageError as exc:
            raise EventError(ErrorCode.INVALID_IMAGE, str(exc)) from None
        result, outputs = await self._call(request, info, inputs)
        probs = probabilities(outputs[info.outputs[0].name], info.postprocessing)[0]
        return web.json_response({
            "model": info.name, "model_version": result.header.model_version,
            "request_id": result.header.request_id, "timings_ms": result.header.timings_ms,
            "predictions": [{"class": i, "label": label, "probability": round(float(p), 6)}
                            for i, label, p in top_k(probs, labels, k)],
        })

    # -- jobs -------------------------------------------------------------------------------

    async def _caller(self, request: web.Request) -> Principal:
        """Who calls: the credentials' principal (anonymous with auth off and none given)."""
        return await self.authenticator.authenticate(_credentials(request))

    async def create_job(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        body = await _json_object(request)
        model_name, version = body.get("model"), body.get("version")
        if not isinstance(model_name, str) or not isinstance(version, str | None):
            raise EventError(ErrorCode.INVALID_REQUEST, "a job needs a 'model' (and may name a 'version'), as strings")
        info = self.registry.resolve(model_name, version)
        inputs = parse_infer_request(orjson.dumps({"inputs": body.get("inputs")}), None, self.limits).inputs
        check_inputs(info, inputs)
        # The worker checks the credentials again and counts the job against the tenant's limit.
        job = InferenceRequest(request_id=events.new_request_id(), model=info.name, version=version,
                               credentials=_credentials(request))
        request[REQUEST_ID] = job.request_id
        await self.jobs.add_job(job.request_id, info.name, job.version, caller.tenant)
        try:
            # No correlation id: nobody waits; the result lands in PostgreSQL.
            await self.client.send(job, inputs, delivered=True, headers=tracing.with_trace([], request[SPAN]))
        except UpstreamUnavailable as exc:
            raise EventError(ErrorCode.UNAVAILABLE, str(exc)) from None
        return web.json_response({"job_id": job.request_id, "status": "pending",
                                  "href": f"/v1/jobs/{job.request_id}"}, status=202)

    async def get_job(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        job_id = request.match_info["job_id"]
        if not _owns(caller, await self.jobs.job_tenant(job_id)):
            raise EventError(ErrorCode.NOT_FOUND, f"no job {job_id}")  # the same whether it exists or not
        row = await self.db.get(job_id)
        if row is None:
            return web.json_response({"job_id": job_id, "status": "pending"})
        answer = {"job_id": job_id, "model": row["model"], "model_version": row["model_version"],
                  "timings_ms": orjson.loads(row["timings_ms"])}
        if row["status"] != "ok":
            answer |= {"status": "failed", "error": {"code": row["error_code"], "message": row["error_message"]}}
        elif row["outputs_ref"]:
            answer |= {"status": "completed", "outputs_ref": row["outputs_ref"],
                       "outputs_url": self.client.store.presigned_get(row["outputs_ref"])}
        else:
            _, tensors = events.decode_bundle(row["outputs"])
            answer |= {"status": "completed", "outputs": [tensor_json(n, a) for n, a in tensors.items()]}
        return web.json_response(answer, dumps=_dumps)

    # -- batches ----------------------------------------------------------------------------

    async def create_batch(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        body = await _json_object(request)
        model_name, input_uri, version = body.get("model"), body.get("input"), body.get("version")
        if not isinstance(model_name, str) or not isinstance(input_uri, str) or not isinstance(version, str | None):
            raise EventError(ErrorCode.INVALID_REQUEST, "a batch needs a 'model' and an 'input' (s3://bucket/key.jsonl"
                             " or s3://bucket/prefix/), and may name a 'version', as strings")
        rate = body.get("rate", self.settings.batch_rate)
        if not isinstance(rate, (int, float)) or not 0 < rate <= 100_000:
            raise EventError(ErrorCode.INVALID_REQUEST, "'rate' is items per second in (0, 100000]")
        info = self.registry.resolve(model_name, version)
        parse_uri(input_uri)
        items = await asyncio.to_thread(list_items, self.client.store, input_uri, info, self.limits)
        if not items:
            raise EventError(ErrorCode.INVALID_REQUEST, f"no items in {input_uri}")
        if len(items) > self.settings.batch_max_items:
            raise EventError(ErrorCode.PAYLOAD_TOO_LARGE,
                             f"{len(items)} items; the limit is {self.settings.batch_max_items}")
        batch_id = "b" + uuid.uuid4().hex
        await self.jobs.add_batch(batch_id, info.name, version, input_uri, float(rate), len(items), caller.tenant)
        try:
            topic, key, value = self.client.topics.batches, batch_id.encode(), orjson.dumps({"batch_id": batch_id})
            claims = {"batch": batch_id, "admission": principal_claims(caller)}
            seal = Sealer(self.settings.cluster_secret).seal(topic, key, value, claims)
            await self.client.produce(topic, key, value, headers=[seal])
        except UpstreamUnavailable as exc:
            raise EventError(ErrorCode.UNAVAILABLE, str(exc)) from None
        return web.json_response({"batch_id": batch_id, "status": "pending", "total": len(items),
                                  "href": f"/v1/batches/{batch_id}"}, status=202)

    async def get_batch(self, request: web.Request) -> web.Response:
        caller = await self._caller(request)
        batch_id = request.match_info["batch_id"]
        batch = await self.jobs.batch(batch_id)
        if batch is None or not _owns(caller, batch.tenant):
            raise EventError(ErrorCode.NOT_FOUND, f"no batch {batch_id}")  # the same whether it exists or not
        done, failed = await self.db.batch_progress(batch_id)
        answer = {"batch_id": batch_id, "model": batch.model, "status": batch.status, "total": batch.total,
                  "published": batch.published, "done": done, "failed": failed, "error": batch.error}
        if batch.output_ref:
            answer |= {"output": batch.output_ref, "output_url": self.client.store.presigned_get(batch.output_ref)}
        return web.json_response(answer)

    # -- registry ---------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response([_public(i) for i in await self.models.list()])

    async def _admin(self, request: web.Request) -> Principal:
        """The caller, if it may change the registry: a principal with the admin scope, or, with
        auth off, anyone who reaches a loopback-bound bridge. Raises 401/403 otherwise."""
        principal = await self.authenticator.authenticate(_credentials(request))
        if may_change_registry(principal, self.settings):
            return principal
        raise EventError(ErrorCode.FORBIDDEN, f"registry changes need the {ADMIN_SCOPE!r} scope")

    async def register_model(self, request: web.Request) -> web.Response:
        await self._admin(request)
        body = await _json_object(request)
        try:
            fields = {k: v for k, v in body.items() if k not in ("name", "version", "artifact")}
            info = await asyncio.to_thread(
                info_from_artifact, str(body["name"]), str(body["version"]), str(body["artifact"]),
                self.client.store, self.settings.state_dir / "artifacts", **fields,
            )
            saved = await self.models.save(info)
        except KeyError as exc:
            raise EventError(ErrorCode.INVALID_REQUEST, f"missing field {exc}") from None
        except ValidationError as exc:
            raise EventError(ErrorCode.INVALID_MODEL, events.problems(exc)) from None
        except (RegistryError, ValueError) as exc:
            raise EventError(ErrorCode.INVALID_MODEL, str(exc)) from None
        return web.json_response(_public(saved), status=201)

    async def update_model(self, request: web.Request) -> web.Response:
        await self._admin(request)
        name, version = request.match_info["model"], request.match_info["version"]
        current = await self.models.get(name, version)
        if current is None:
            raise EventError(ErrorCode.UNKNOWN_VERSION, f"no registered version {name}/{version}")
        changes = await _json_object(request)
        allowed = {"weight", "status", "shadow", "max_batch_delay_ms", "backends", "description"}
        if set(changes) - allowed:
            raise EventError(ErrorCode.INVALID_REQUEST, f"can change only {sorted(allowed)}")
        try:
            updated = ModelInfo.model_validate({**current.model_dump(), **changes})
            saved = await self.models.save(updated)
        except ValidationError as exc:
            raise EventError(ErrorCode.INVALID_MODEL, events.problems(exc)) from None
        except (RegistryError, ValueError) as exc:
            raise EventError(ErrorCode.INVALID_MODEL, str(exc)) from None
        return web.json_response(_public(saved))

    async def retire_model(self, request: web.Request) -> web.Response:
        await self._admin(request)
        name, version = request.match_info["model"], request.match_info["version"]
        current = await self.models.get(name, version)
        if current is None:
            raise EventError(ErrorCode.UNKNOWN_VERSION, f"no registered version {name}/{version}")
        saved = await self.models.save(current.model_copy(update={"status": "retired"}), validate=False)
        return web.json_response(_public(saved))

    # -- documents --------------------------------------------------------------------------

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(ROUTES))

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.prometheus), content_type="text/plain")


class _ReplyCounters:
    """Exports the client's reply counters as Prometheus counters."""

    def __init__(self, client: InferenceClient) -> None:
        self.client = client

    def collect(self):
        late = CounterMetricFamily("inferstream_bridge_late_replies", "replies after their deadline, dropped")
        late.add_metric([], self.client.late_replies)
        foreign = CounterMetricFamily("inferstream_bridge_unmatched_replies", "replies for no waiting request")
        foreign.add_metric([], self.client.foreign_replies)
        return [late, foreign]


def _public(info: ModelInfo) -> dict:
    return info.model_dump(mode="json", exclude={"path"})


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise EventError(ErrorCode.INVALID_REQUEST, f"{name} must be an integer in [{low}, {high}]")
    return int(raw)


async def _image_bytes(request: web.Request) -> bytes:
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, BodyPartReader) and part.name in ("image", "file"):
                return bytes(await part.read())
        raise EventError(ErrorCode.INVALID_REQUEST, "multipart body has no 'image' part")
    data = await request.read()
    if not data:
        raise EventError(ErrorCode.INVALID_REQUEST, "empty body: send the image bytes")
    return data


def _owns(caller: Principal, tenant: str | None) -> bool:
    """Whether the caller may read what `tenant` submitted: its own tenant, or an admin."""
    return tenant is not None and (caller.tenant == tenant or caller.is_admin)


def _credentials(request: web.Request) -> Credentials | None:
    """The caller's credentials: `Authorization` (bearer token) and/or `X-API-Key`."""
    auth, key = request.headers.get("Authorization"), request.headers.get("X-API-Key")
    try:
        return Credentials(authorization=auth, api_key=key) if auth or key else None
    except ValidationError:
        raise EventError(ErrorCode.UNAUTHENTICATED, "malformed credentials") from None


async def _json_object(request: web.Request) -> dict:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise EventError(ErrorCode.INVALID_REQUEST, f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise EventError(ErrorCode.INVALID_REQUEST, "body must be a JSON object")
    return body


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def may_change_registry(principal: Principal, settings: Settings) -> bool:
    """An admin may; with auth off, so may anyone who reaches a loopback-bound bridge."""
    return principal.is_admin or (principal is ANONYMOUS and is_loopback(settings.bridge_host))


def check_exposure(settings: Settings) -> None:
    """Refuse to serve without auth on an address other machines reach, unless told to."""
    if not settings.auth_required and not is_loopback(settings.bridge_host) and not settings.bridge_open_without_auth:
        raise ValueError(
            f"the bridge would listen on {settings.bridge_host} with auth off: set INFERSTREAM_AUTH_REQUIRED=true, "
            "bind 127.0.0.1, or set INFERSTREAM_BRIDGE_OPEN_WITHOUT_AUTH=true where the network is the boundary")


def run_bridge(settings: Settings) -> None:
    check_exposure(settings)
    setup_logging(settings, "bridge")
    tracing.setup_tracing(settings, "inferstream-bridge")

    async def make_app() -> web.Application:  # Kafka clients must be made inside the loop
        return Bridge(settings).app()

    # No access log: the middleware logs each request with its request and trace ids.
    web.run_app(make_app(), host=settings.bridge_host, port=settings.bridge_port, access_log=None,
                print=lambda _: log.info("bridge listening on http://%s:%d",
                                         settings.bridge_host, settings.bridge_port))
