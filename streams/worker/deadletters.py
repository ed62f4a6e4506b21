"""Dead letters as written.

The original event is redacted (no `credentials` in its header, no credential Kafka headers) and
carried inline when small, else stored in S3 under a key derived from its source position, so a
redelivered event rewrites the same object. Every part of the record that comes from the event
is bounded, so a dead letter always fits in a Kafka message, whatever the event was.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Protocol

from streams.settings import Settings
from topics import events
from topics.errors import ErrorCode
from topics.events import DeadLetter

Headers = list[tuple[str, bytes]]
Put = Callable[[str, bytes], Awaitable[str]]  # (key, data) -> the s3:// URI written

MESSAGE_CHARS = 1000
REQUEST_ID_CHARS = 128  # InferenceRequest's bound: anything longer is no request id
CARRIED_KEY_BYTES = 16 * 1024
CARRIED_HEADER_BYTES = 64 * 1024
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})


class Source(Protocol):
    """The consumed record being dead-lettered."""

    value: bytes
    key: bytes | None
    headers: Headers
    topic: str
    partition: int
    offset: int


def object_key(topic: str, partition: int, offset: int) -> str:
    return f"deadletters/{topic}/{partition}/{offset}.bin"


def inline_limit(settings: Settings) -> int:
    """Originals up to this size travel inline. Base64 grows them by a third: at most half the
    message limit keeps the letter under it whatever `deadletter_inline_bytes` says."""
    return min(settings.deadletter_inline_bytes, settings.max_message_bytes // 2)


def bounded(text: str, limit: int = MESSAGE_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def carried_headers(headers: Headers) -> tuple[Headers, bool, int]:
    """The original's Kafka headers that the dead letter carries: no credential headers (any
    case), and at most CARRIED_HEADER_BYTES of the rest, in order. Returns (headers, whether
    credential headers were removed, how many others were left out for size)."""
    kept: Headers = []
    redacted, dropped, size = False, 0, 0
    for name, value in headers:
        if name.lower() in CREDENTIAL_HEADERS:
            redacted = True
            continue
        length = len(name) + len(value or b"")
        if size + length > CARRIED_HEADER_BYTES:
            dropped += 1
            continue
        size += length
        kept.append((name, value))
    return kept, redacted, dropped


async def dead_letter(source: Source, reason: ErrorCode, message: str, request_id: str | None,
                      put: Put, settings: Settings) -> tuple[DeadLetter, bytes | None, Headers]:
    """The dead letter of `source`, with the Kafka key and headers to send it with. An original
    over the inline limit is written with `put` first (a service outage raises: retry the step)."""
    original, redacted = events.redact_credentials(source.value)
    headers, headers_redacted, headers_dropped = carried_headers(source.headers)
    key_dropped = source.key is not None and len(source.key) > CARRIED_KEY_BYTES
    inline = len(original) <= inline_limit(settings)
    ref = None if inline else await put(object_key(source.topic, source.partition, source.offset), original)
    letter = DeadLetter(
        reason=reason, message=bounded(message), source_topic=source.topic, source_partition=source.partition,
        source_offset=source.offset,
        request_id=request_id if request_id and len(request_id) <= REQUEST_ID_CHARS else None,
        original_bytes=len(original), redacted=redacted or headers_redacted, headers_dropped=headers_dropped,
        key_dropped=key_dropped, original_ref=ref, original_b64=base64.b64encode(original).decode() if inline else None,
    )
    return letter, None if key_dropped else source.key, headers
