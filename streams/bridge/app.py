"""The HTTP bridge: turns HTTP calls into request events and waits for their replies. It holds
no model and runs no inference.

- Open Inference Protocol (KServe v2 / Triton HTTP, with the binary tensor extension), so
  `tritonclient.http` works against it unchanged: `oip`.
- `/v1/models/{model}/classify`: an image in, top-k labels out: `images`.
- `/v1/jobs` and `/v1/batches`: work that should not hold a connection open; results come from
  PostgreSQL and S3: `jobs`.
- `/v1/models`: the registry, read and changed: `admin`.

Here: the services the routes share and their lifecycle, the middleware (traces, metrics, logs,
and the one map from errors to HTTP answers), /openapi.json and /metrics.

Each bridge instance reads replies from a reply topic of its own, by partition assignment, so
several instances behind a load balancer never see each other's replies.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from streams.bridge import admin, images, jobs, oip
from streams.bridge.admin import is_loopback
from streams.bridge.openapi import Endpoint, openapi_document
from streams.bridge.requests import REQUEST_ID, SPAN, credentials, dumps, timeout_s
from streams.client import InferenceClient, ReplyTimeout, UpstreamUnavailable
from streams.gate.auth import ApiKeyStore, Authenticator, Principal
from streams.gate.gatekeeper import jwt_verifier
from streams.kafka.admin import ensure_topics
from streams.lifecycle import Service
from streams.registry.records import ModelInfo, ModelRegistry
from streams.registry.routing import check_inputs
from streams.registry.store import RegistryFollower, RegistryStore
from streams.serving.oip import Limits, ProtocolError
from streams.settings import Settings, refuse_placeholder_secrets
from streams.storage.jobs import JobStore
from streams.storage.results import ResultsStore
from streams.storage.schema import migrate
from streams.telemetry import tracing
from streams.telemetry.logs import log_request, setup_logging
from topics.errors import HTTP_STATUS, ErrorCode, EventError
from topics.events import Result
from topics.names import Topics, TopicSpec

log = logging.getLogger(__name__)

# Probes and scrapes: counted in the metrics, not logged line by line.
QUIET_ROUTES = {"/metrics", "/v2/health/live", "/v2/health/ready"}
# aiohttp's own refusals, in the bridge's vocabulary.
ROUTING_ERRORS = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED, 413: ErrorCode.PAYLOAD_TOO_LARGE}


@dataclass(frozen=True)
class Stores:
    """What needs the PostgreSQL pool, so exists once the bridge has started."""

    jobs: JobStore
    models: RegistryStore
    authenticator: Authenticator


class Bridge(Service):
    """The services every route shares: the registry (followed from its topic), the Kafka client
    on this instance's reply topic, PostgreSQL, Redis, the authenticator, the metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = ModelRegistry()  # kept current by the follower
        self.follower = RegistryFollower(settings, self.registry)
        self.instance = settings.bridge_instance or uuid.uuid4().hex[:12]
        self.client = InferenceClient(settings, reply_topic=Topics(settings.topic_prefix).bridge_replies(self.instance))
        self.db = ResultsStore(settings.postgres_dsn)
        self.redis = aioredis.from_url(settings.redis_url)  # connects on first use
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
        self._stores: Stores | None = None  # set by start
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._stores is not None:
            return
        own = TopicSpec(self.client.reply_topic, self.settings.reply_partitions, self.settings.reply_retention_ms)
        await ensure_topics(self.settings, [], extra=[own])
        await self.follower.start()
        await self.client.start()
        await migrate(self.settings.postgres_dsn)
        await self.db.start()
        keys = ApiKeyStore(self.db.pool, self.redis, self.settings.api_key_pepper,
                           self.settings.api_key_cache_ttl_s, key_prefix=self.settings.topic_prefix)
        self._stores = Stores(
            jobs=JobStore(self.db.pool),
            models=RegistryStore(self.settings, self.db.pool, self.redis),
            authenticator=Authenticator(jwt_verifier(self.settings), keys, self.settings.auth_required),
        )
        log.info("bridge %s reads replies from %s", self.instance, self.client.reply_topic)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.follower.stop()
        await self.client.stop()
        await self.redis.aclose()
        await self.db.stop()
        if not self.settings.bridge_instance:  # a random instance's topic is never read again
            admin_client = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
            await admin_client.start()
            try:
                await admin_client.delete_topics([self.client.reply_topic])
            except Exception as exc:  # noqa: BLE001 - leaving the topic behind is harmless
                log.warning("could not delete %s: %r", self.client.reply_topic, exc)
            finally:
                await admin_client.close()

    @property
    def stores(self) -> Stores:
        if self._stores is None:
            raise RuntimeError("the bridge is not started")
        return self._stores

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.bridge_max_body_bytes, middlewares=[self._errors])
        for endpoint in ROUTES:
            app.router.add_route(endpoint.method, endpoint.path, functools.partial(endpoint.handler, self))
        app.on_startup.append(lambda _: self.start())
        app.on_cleanup.append(lambda _: self.stop())
        return app

    # -- middleware ---------------------------------------------------------------------------

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
        """The handler's response or, for what it raised, the error's JSON answer: a stable code and
        a message (`error` is what tritonclient shows), with the code's one status."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # a redirect is an answer, not an error
            failure = self._refusal(exc)
        except EventError as exc:
            failure = exc
        except ProtocolError as exc:
            failure = EventError(ErrorCode.INVALID_REQUEST, exc.message)
        except Exception:  # noqa: BLE001 - logged here; the caller gets no stack trace
            log.exception("unhandled error on %s %s", request.method, request.path)
            failure = EventError(ErrorCode.INTERNAL, "internal error")
        return web.json_response({"error": failure.message, "code": failure.code.value},
                                 status=HTTP_STATUS[failure.code], dumps=dumps)

    def _refusal(self, exc: web.HTTPException) -> EventError:
        """What aiohttp refused before or while reading the request, in the bridge's vocabulary."""
        if isinstance(exc, web.HTTPRequestEntityTooLarge):
            return EventError(ErrorCode.PAYLOAD_TOO_LARGE,
                              f"request body over {self.settings.bridge_max_body_bytes} bytes")
        return EventError(ROUTING_ERRORS.get(exc.status, ErrorCode.INVALID_REQUEST), exc.reason)

    # -- what the routes share ----------------------------------------------------------------

    def resolve(self, request: web.Request) -> ModelInfo:
        """The version the route's model (and version, where the path names one) resolves to."""
        return self.registry.resolve(request.match_info["model"], request.match_info.get("version"))

    async def caller(self, request: web.Request) -> Principal:
        """Who calls: the credentials' principal (anonymous with auth off and none given)."""
        return await self.stores.authenticator.authenticate(credentials(request))

    async def call(self, request: web.Request, info: ModelInfo, inputs: dict[str, np.ndarray],
                   request_id: str | None = None) -> tuple[Result, dict[str, np.ndarray]]:
        """Send a request event for `inputs` and wait for its result: the reply and its outputs."""
        check_inputs(info, inputs)  # refuse at the edge what the worker would refuse
        event = self.client.request(
            info.name, version=request.match_info.get("version"),
            timeout=timeout_s(request, self.settings.bridge_timeout_s), credentials=credentials(request),
        )
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


# -- documents --------------------------------------------------------------------------------


async def openapi(bridge: Bridge, request: web.Request) -> web.Response:
    return web.json_response(openapi_document(ROUTES))


async def metrics(bridge: Bridge, request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(bridge.prometheus), content_type="text/plain")


# In the order aiohttp matches them, and /openapi.json lists them.
ROUTES = [
    *oip.ROUTES, *images.ROUTES, *jobs.ROUTES, *admin.ROUTES,
    Endpoint("GET", "/openapi.json", openapi, "This document"),
    Endpoint("GET", "/metrics", metrics, "Prometheus metrics", answers="text/plain"),
]


def check_exposure(settings: Settings) -> None:
    """Refuse to serve without auth on an address other machines reach, unless told to."""
    if not settings.auth_required and not is_loopback(settings.bridge_host) and not settings.bridge_open_without_auth:
        raise ValueError(
            f"the bridge would listen on {settings.bridge_host} with auth off: set INFERSTREAM_AUTH_REQUIRED=true, "
            "bind 127.0.0.1, or set INFERSTREAM_BRIDGE_OPEN_WITHOUT_AUTH=true where the network is the boundary")


def run_bridge(settings: Settings) -> None:
    check_exposure(settings)
    refuse_placeholder_secrets(settings)
    setup_logging(settings, "bridge")
    tracing.setup_tracing(settings, "inferstream-bridge")

    async def make_app() -> web.Application:  # Kafka clients must be made inside the loop
        return Bridge(settings).app()

    # No access log: the middleware logs each request with its request and trace ids.
    web.run_app(make_app(), host=settings.bridge_host, port=settings.bridge_port, access_log=None,
                print=lambda _: log.info("bridge listening on http://%s:%d",
                                         settings.bridge_host, settings.bridge_port))
