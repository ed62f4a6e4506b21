"""What the route handlers read from an HTTP request (the JSON body, credentials, a bounded
parameter, the deadline header), the values a request carries through the middleware, and the
JSON writer of responses."""

from __future__ import annotations

import orjson
from aiohttp import web
from opentelemetry.trace import Span
from pydantic import ValidationError

from topics.errors import ErrorCode, EventError
from topics.events import Credentials

# Request-scoped values: the request's trace span, and the id of the event it produced.
SPAN = web.RequestKey("inferstream_span", Span)
REQUEST_ID = web.RequestKey("inferstream_request_id", str)
HEADER_LENGTH = "Inference-Header-Content-Length"
TIMEOUT_HEADER = "X-Inferstream-Timeout"  # seconds; the request's deadline


def dumps(value: object) -> str:
    """JSON for a response body; tensors may hold numpy values."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


async def json_object(request: web.Request) -> dict:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise EventError(ErrorCode.INVALID_REQUEST, f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise EventError(ErrorCode.INVALID_REQUEST, "body must be a JSON object")
    return body


def credentials(request: web.Request) -> Credentials | None:
    """The caller's credentials: `Authorization` (bearer token) and/or `X-API-Key`."""
    auth, key = request.headers.get("Authorization"), request.headers.get("X-API-Key")
    try:
        return Credentials(authorization=auth, api_key=key) if auth or key else None
    except ValidationError:
        raise EventError(ErrorCode.UNAUTHENTICATED, "malformed credentials") from None


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise EventError(ErrorCode.INVALID_REQUEST, f"{name} must be an integer in [{low}, {high}]")
    return int(raw)


def timeout_s(request: web.Request, default: float) -> float:
    """The request's deadline: its timeout header, else `default`."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if not 0 < value <= 3600:
        raise EventError(ErrorCode.INVALID_REQUEST, f"{TIMEOUT_HEADER} must be seconds in (0, 3600]")
    return value
