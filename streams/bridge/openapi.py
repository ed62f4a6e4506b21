"""The bridge's endpoints and the OpenAPI document made from them: each says how a route is
served and how it is described (parameters, headers, request body, every status it answers)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

from aiohttp import web

from streams.registry.records import NAME_PATTERN, VersionStatus
from streams.serving.backends import BACKENDS
from topics.errors import HTTP_STATUS, ErrorCode

if TYPE_CHECKING:
    from streams.bridge.app import Bridge

VERSION = "0.1.0"

# What serves a route: the bridge's shared services and the request.
Handler = Callable[["Bridge", web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Endpoint:
    """One route of the bridge: how it is served and how /openapi.json describes it."""

    method: str
    path: str
    handler: Handler
    summary: str
    ok: int = 200  # the success status
    errors: tuple[ErrorCode, ...] = ()  # the codes it answers beyond those every route may
    body: str | None = None  # the request body: a schema of SCHEMAS, or "image"
    query: tuple[str, ...] = ()  # query parameters, described in PARAMETERS
    headers: tuple[str, ...] = ()  # request headers, described in PARAMETERS
    answers: str = "application/json"  # the success body's media type


# Every route may answer these: a bug (logged, never described), a body over the limit, a
# request aiohttp refuses before the handler (wrong method).
COMMON_ERRORS = (ErrorCode.INTERNAL, ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.METHOD_NOT_ALLOWED)
CALLER = ("Authorization", "X-API-Key")  # headers of a route that checks the caller
CREDENTIAL_ERRORS = (ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN)
REQUEST_ERRORS = (ErrorCode.INVALID_REQUEST,)
UNKNOWN = (ErrorCode.UNKNOWN_MODEL, ErrorCode.UNKNOWN_VERSION)
# What a request for inference may be answered, through the worker or at the edge.
INFERENCE = (
    ErrorCode.INVALID_REQUEST, ErrorCode.INVALID_TENSOR, ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN,
    ErrorCode.UNKNOWN_MODEL, ErrorCode.UNKNOWN_VERSION, ErrorCode.DUPLICATE_REQUEST, ErrorCode.PAYLOAD_UNAVAILABLE,
    ErrorCode.RATE_LIMITED, ErrorCode.INFERENCE_FAILED, ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED,
)

_NAME = {"type": "string", "pattern": NAME_PATTERN}
PARAMETERS: dict[str, dict[str, Any]] = {
    "model": {"in": "path", "schema": _NAME, "description": "model name", "example": "tiny"},
    "version": {"in": "path", "schema": _NAME, "description": "model version", "example": "1"},
    "job_id": {"in": "path", "schema": {"type": "string", "maxLength": 128}},
    "batch_id": {"in": "path", "schema": {"type": "string", "maxLength": 128}},
    "region": {"in": "path", "schema": {"type": "string", "maxLength": 128}},
    "top_k": {"in": "query", "schema": {"type": "integer", "minimum": 1}, "description": "labels to return (5)"},
    "Authorization": {"in": "header", "schema": {"type": "string"}, "description": "Bearer <JWT>"},
    "X-API-Key": {"in": "header", "schema": {"type": "string"}, "description": "an API key (isk_...)"},
    "X-Inferstream-Timeout": {"in": "header", "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
                              "description": "the request's deadline, in seconds"},
    "Inference-Header-Content-Length": {
        "in": "header", "schema": {"type": "integer", "minimum": 0},
        "description": "binary tensor extension: length of the JSON header before the tensor bytes"},
}

_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
              "FP16", "FP32", "FP64", "BYTES"]
_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    "datatype": {"type": "string", "enum": _DATATYPES}, "parameters": {"type": "object"},
    "data": {"type": "array", "description": "the elements, flat or nested in row-major order"}}}
_SIGNATURE = {"type": "object", "required": ["name", "dtype", "shape"], "properties": {
    "name": {"type": "string"}, "dtype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}}}}
_BACKEND = {"type": "object", "properties": {
    "kind": {"enum": list(BACKENDS)}, "url": {"type": "string", "description": "triton: host:port"},
    "protocol": {"enum": ["grpc", "http"]}, "model_name": {"type": "string"}}}
_CHANGES = {
    "status": {"enum": list(get_args(VersionStatus))}, "weight": {"type": "integer", "minimum": 0},
    "shadow": {"type": "boolean"}, "max_batch_delay_ms": {"type": ["number", "null"], "minimum": 0},
    "backends": {"type": "array", "items": {"$ref": "#/components/schemas/Backend"}},
    "description": {"type": "string"},
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {"type": "object", "required": ["error", "code"], "properties": {
        "error": {"type": "string", "description": "what went wrong"},
        "code": {"type": "string", "enum": [c.value for c in ErrorCode], "description": "stable error code"}}},
    "Tensor": _TENSOR,
    "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}}}}},
    "JobRequest": {"type": "object", "required": ["model", "inputs"], "properties": {
        "model": _NAME, "version": _NAME,
        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}}}},
    "BatchRequest": {"type": "object", "required": ["model", "input"], "properties": {
        "model": _NAME, "version": _NAME,
        "input": {"type": "string", "description": "s3://bucket/key.jsonl, or s3://bucket/prefix/ of images"},
        "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000, "description": "items per second"}}},
    "Backend": _BACKEND,
    "Signature": _SIGNATURE,
    "ModelRegistration": {"type": "object", "required": ["name", "version", "artifact"], "properties": {
        "name": _NAME, "version": _NAME,
        "artifact": {"type": "string", "description": "model.onnx: a local path or s3://bucket/key"},
        "max_batch_size": {"type": "integer", "minimum": 0},
        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Signature"}},
        "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Signature"}},
        **_CHANGES}},
    "ModelChange": {"type": "object", "additionalProperties": False, "properties": _CHANGES},
    "RepositoryIndexRequest": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
}
_IMAGE = {"content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"}}}}}}
# Binary tensor extension: the JSON header (Inference-Header-Content-Length bytes), then the tensors.
_BINARY_INFER = {"schema": {"type": "string", "format": "binary"}}


def openapi_document(routes: list[Endpoint]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary, "operationId": _operation_id(route, seen),
            "parameters": [_parameter(name) for name in _path_parameters(route.path) + route.query + route.headers],
            "responses": _responses(route),
        }
        if route.body == "image":
            operation["requestBody"] = {"required": True, **_IMAGE}
        elif route.body is not None:
            content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}}
            if route.body == "InferRequest":
                content["application/octet-stream"] = _BINARY_INFER
            operation["requestBody"] = {"required": route.body != "RepositoryIndexRequest", "content": content}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "inferstream bridge", "version": VERSION,
                 "description": "Open Inference Protocol (KServe v2 / Triton HTTP) and inferstream's own routes."},
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }


def _path_parameters(path: str) -> tuple[str, ...]:
    return tuple(re.findall(r"{(\w+)}", path))


def _parameter(name: str) -> dict[str, Any]:
    spec = PARAMETERS[name]
    return {"name": name, "required": spec["in"] == "path", **spec}


def _operation_id(route: Endpoint, seen: set[str]) -> str:
    """The method and the path's words: unique even where one handler serves several paths."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", route.path) if w and w not in ("v1", "v2")]
    operation_id = "_".join([route.method.lower(), *words])
    if operation_id in seen:
        raise ValueError(f"two routes make the operationId {operation_id}")
    seen.add(operation_id)
    return operation_id


def _responses(route: Endpoint) -> dict[str, Any]:
    success: dict[str, Any] = {"description": "OK" if route.ok == 200 else "Accepted" if route.ok == 202 else "Created"}
    if route.answers == "application/json":
        success["content"] = {"application/json": {"schema": {}}}
    elif route.answers == "infer":
        success["content"] = {"application/json": {"schema": {"type": "object"}},
                              "application/octet-stream": _BINARY_INFER}
    else:
        success["content"] = {route.answers: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(route.ok): success}
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(route.errors + COMMON_ERRORS):
        by_status.setdefault(HTTP_STATUS[code], []).append(code.value)
    for status, codes in sorted(by_status.items()):
        responses[str(status)] = {
            "description": ", ".join(codes),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return responses
