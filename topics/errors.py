"""Stable error codes carried in error results and dead letters."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    UNDECODABLE = "UNDECODABLE"  # bytes are neither a binary nor a JSON event
    INVALID_SCHEMA = "INVALID_SCHEMA"  # decodable, but fields are missing or malformed
    UNKNOWN_MODEL = "UNKNOWN_MODEL"
    UNKNOWN_VERSION = "UNKNOWN_VERSION"
    INVALID_TENSOR = "INVALID_TENSOR"  # missing input, wrong dtype or shape, bad tensor bytes
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    PAYLOAD_UNAVAILABLE = "PAYLOAD_UNAVAILABLE"  # an S3 reference that cannot be read
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INVALID_REPLY_TO = "INVALID_REPLY_TO"  # an internal, malformed or missing reply topic
    DUPLICATE_REQUEST = "DUPLICATE_REQUEST"  # a request id already admitted with another body
    UNAUTHENTICATED = "UNAUTHENTICATED"  # no, or invalid, credentials
    FORBIDDEN = "FORBIDDEN"  # valid credentials without the right to this model
    RATE_LIMITED = "RATE_LIMITED"
    UNAVAILABLE = "UNAVAILABLE"  # every backend of the version is down, or the limiter's store is
    INFERENCE_FAILED = "INFERENCE_FAILED"
    INTERNAL = "INTERNAL"
    INVALID_IMAGE = "INVALID_IMAGE"  # image bytes that do not decode, or over the size bounds
    # Answered only at the HTTP edge.
    INVALID_REQUEST = "INVALID_REQUEST"  # a malformed body, parameter or header
    INVALID_MODEL = "INVALID_MODEL"  # a registration or change the registry refuses
    UNSUPPORTED = "UNSUPPORTED"  # a Triton/KServe route this server does not offer
    NOT_FOUND = "NOT_FOUND"  # no such route, job or batch (or not the caller's)
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"


# The one HTTP status of each code, on every route of the bridge.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.UNDECODABLE: 400, ErrorCode.INVALID_SCHEMA: 400, ErrorCode.INVALID_TENSOR: 400,
    ErrorCode.INVALID_REPLY_TO: 400, ErrorCode.INVALID_REQUEST: 400, ErrorCode.INVALID_IMAGE: 400,
    ErrorCode.INVALID_MODEL: 400, ErrorCode.UNSUPPORTED: 400,
    ErrorCode.UNAUTHENTICATED: 401, ErrorCode.FORBIDDEN: 403,
    ErrorCode.UNKNOWN_MODEL: 404, ErrorCode.UNKNOWN_VERSION: 404, ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405, ErrorCode.DUPLICATE_REQUEST: 409, ErrorCode.PAYLOAD_TOO_LARGE: 413,
    # Well-formed, but names data that cannot be read (a missing S3 object).
    ErrorCode.PAYLOAD_UNAVAILABLE: 422,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INFERENCE_FAILED: 500, ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503, ErrorCode.DEADLINE_EXCEEDED: 504,
}


def printable(text: str) -> str:
    """The text with control characters replaced: messages quote what callers sent, and must
    neither carry terminal escapes nor NUL (which PostgreSQL cannot store)."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


class EventError(Exception):
    """A request that cannot be served; goes to the dead-letter topic and, when possible, back
    to the caller as an error result."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        message = printable(message)
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
