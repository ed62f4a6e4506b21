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
