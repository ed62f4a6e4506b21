"""Open Inference Protocol routes (KServe v2 / Triton HTTP, with the binary tensor extension):
health, server and model metadata, configuration, statistics, the repository index, inference,
and the Triton routes this server does not offer."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from redis.exceptions import RedisError

from streams.bridge.openapi import CALLER, INFERENCE, UNKNOWN, Endpoint
from streams.bridge.requests import HEADER_LENGTH, TIMEOUT_HEADER, json_object
from streams.serving.oip import (
    build_infer_response,
    model_config,
    model_metadata,
    parse_infer_request,
    repository_index,
    unsupported_message,
)
from streams.telemetry import model_stats
from streams.telemetry import presence as heartbeats
from streams.telemetry.presence import served
from topics.errors import ErrorCode, EventError

if TYPE_CHECKING:
    from streams.bridge.app import Bridge

REDIS_READ_TIMEOUT_S = 2.0  # heartbeats and statistics: a slow Redis is an unavailable one


async def live(bridge: Bridge, request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(bridge: Bridge, request: web.Request) -> web.Response:
    if not await bridge.client.broker_ready():
        raise EventError(ErrorCode.UNAVAILABLE, "the broker is not reachable")
    workers = await _live_workers(bridge)
    if not workers:
        ttl_s = bridge.settings.heartbeat_interval_s * heartbeats.TTL_INTERVALS
        raise EventError(ErrorCode.UNAVAILABLE, f"no worker of group {bridge.settings.app_id!r} is live: none has "
                         f"sent a heartbeat in the last {ttl_s:g} s")
    return web.json_response({"ready": True, "workers": len(workers)})


async def server_metadata(bridge: Bridge, request: web.Request) -> web.Response:
    return web.json_response({"name": "inferstream", "version": "0.1.0", "extensions": ["binary_tensor_data"]})


async def metadata(bridge: Bridge, request: web.Request) -> web.Response:
    info = bridge.resolve(request)
    return web.json_response(model_metadata(info, bridge.registry.versions(info.name)))


async def model_ready(bridge: Bridge, request: web.Request) -> web.Response:
    info = bridge.resolve(request)
    wanted = {info.key} if "version" in request.match_info else {i.key for i in bridge.registry.routable(info.name)}
    missing = sorted(wanted - served(await _live_workers(bridge)))
    if missing:
        raise EventError(ErrorCode.UNAVAILABLE, f"not ready: no live worker serves {', '.join(missing)}")
    return web.json_response({"name": info.name, "ready": True})


async def config(bridge: Bridge, request: web.Request) -> web.Response:
    info = bridge.resolve(request)
    delay = bridge.settings.max_batch_delay_ms if info.max_batch_delay_ms is None else info.max_batch_delay_ms
    return web.json_response(model_config(info, delay))


async def stats(bridge: Bridge, request: web.Request) -> web.Response:
    if "model" not in request.match_info:
        versions = [(i.name, i.version) for i in bridge.registry.all() if i.status != "retired"]
    elif "version" in request.match_info:
        info = bridge.resolve(request)
        versions = [(info.name, info.version)]
    else:
        name = bridge.resolve(request).name
        versions = [(name, v) for v in bridge.registry.versions(name)]
    try:
        found = await asyncio.wait_for(model_stats.read(bridge.redis, bridge.settings.topic_prefix, versions),
                                       REDIS_READ_TIMEOUT_S)
    except (RedisError, OSError, TimeoutError):
        raise EventError(ErrorCode.UNAVAILABLE, "statistics cannot be read: Redis is unavailable") from None
    return web.json_response({"model_stats": found})


async def index(bridge: Bridge, request: web.Request) -> web.Response:
    body = await json_object(request) if (await request.read()).strip() else {}
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise EventError(ErrorCode.INVALID_REQUEST, "'ready' must be a boolean")
    live_versions = served(await _live_workers(bridge))
    return web.json_response(repository_index(bridge.registry.all(), live_versions, ready_only))


async def unsupported(bridge: Bridge, request: web.Request) -> web.Response:
    raise EventError(ErrorCode.UNSUPPORTED, unsupported_message(request.path))


async def infer(bridge: Bridge, request: web.Request) -> web.Response:
    info = bridge.resolve(request)
    header_length = request.headers.get(HEADER_LENGTH)
    try:
        length = int(header_length) if header_length is not None else None
    except ValueError:
        raise EventError(ErrorCode.INVALID_REQUEST, f"{HEADER_LENGTH} must be an integer") from None
    body = parse_infer_request(await request.read(), length, bridge.limits)
    result, outputs = await bridge.call(request, info, body.inputs, body.id)
    payload, json_length = build_infer_response(
        info.name, result.header.model_version or info.version, body.id, outputs, body
    )
    content_type = "application/octet-stream" if json_length else "application/json"
    response = web.Response(body=payload, content_type=content_type)
    if json_length is not None:
        response.headers[HEADER_LENGTH] = str(json_length)
    return response


async def _live_workers(bridge: Bridge) -> list[heartbeats.WorkerBeat]:
    try:
        return await asyncio.wait_for(
            heartbeats.live_workers(bridge.redis, bridge.settings.topic_prefix, bridge.settings.app_id),
            REDIS_READ_TIMEOUT_S)
    except (RedisError, OSError, TimeoutError):
        raise EventError(ErrorCode.UNAVAILABLE, "worker heartbeats cannot be read: Redis is unavailable") from None


ROUTES = [
    Endpoint("GET", "/v2/health/live", live, "Liveness"),
    Endpoint("GET", "/v2/health/ready", ready,
             "Readiness: the broker takes requests and a worker of the group is live", errors=(ErrorCode.UNAVAILABLE,)),
    Endpoint("GET", "/v2", server_metadata, "Server metadata"),
    # Before /v2/models/{model}, which would take "stats" for a model name.
    Endpoint("GET", "/v2/models/stats", stats, "Inference statistics of every version (Triton's format)",
             errors=(ErrorCode.UNAVAILABLE,)),
    Endpoint("GET", "/v2/models/{model}", metadata, "Model metadata (newest version)", errors=UNKNOWN),
    Endpoint("GET", "/v2/models/{model}/versions/{version}", metadata, "Model metadata", errors=UNKNOWN),
    Endpoint("GET", "/v2/models/{model}/ready", model_ready,
             "Model readiness: a live worker serves every version unversioned requests reach",
             errors=(*UNKNOWN, ErrorCode.UNAVAILABLE)),
    Endpoint("GET", "/v2/models/{model}/versions/{version}/ready", model_ready,
             "Model version readiness: a live worker serves the version", errors=(*UNKNOWN, ErrorCode.UNAVAILABLE)),
    Endpoint("GET", "/v2/models/{model}/config", config, "Model configuration (Triton's JSON form)",
             errors=UNKNOWN),
    Endpoint("GET", "/v2/models/{model}/versions/{version}/config", config, "Model version configuration",
             errors=UNKNOWN),
    Endpoint("GET", "/v2/models/{model}/stats", stats, "Inference statistics of a model's versions",
             errors=(*UNKNOWN, ErrorCode.UNAVAILABLE)),
    Endpoint("GET", "/v2/models/{model}/versions/{version}/stats", stats, "Inference statistics of a version",
             errors=(*UNKNOWN, ErrorCode.UNAVAILABLE)),
    Endpoint("POST", "/v2/repository/index", index,
             "Registered versions, READY where a live worker serves them (body: optional {\"ready\": bool})",
             body="RepositoryIndexRequest", errors=(ErrorCode.INVALID_REQUEST, ErrorCode.UNAVAILABLE)),
    *(Endpoint(method, path, unsupported, f"Not supported: answers {ErrorCode.UNSUPPORTED.value}",
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
    *(Endpoint("POST", path, infer, summary, body="InferRequest", headers=(*CALLER, TIMEOUT_HEADER, HEADER_LENGTH),
               errors=INFERENCE, answers="infer") for path, summary in (
        ("/v2/models/{model}/infer", "Inference (Open Inference Protocol, binary tensors too)"),
        ("/v2/models/{model}/versions/{version}/infer", "Inference on a version"))),
]
