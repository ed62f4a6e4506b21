"""The one error policy of every agent step: what a failure means and what is done about it.

- An **outage** (broker, PostgreSQL, Redis answering with a connection error, S3; a model server
  of this worker that stopped under a request, as on shutdown or reload, or that is still
  loading): the data is fine, the
  service is not. The whole chunk is retried with backoff, however long it takes;
  acknowledging would lose the events.
- A **bad event** (`EventError`): that request alone is rejected at once, with its reason, to
  the dead-letter topic and (where the caller is known) its reply topic.
- A **bug** (any other exception): unexpected, so never trusted to be about the data or not. Per
  event, where the steps can tell which event raised, it is rejected alone as INTERNAL; a step
  that fails as a whole is retried once, then split in halves until the event that fails alone is
  found and dead-lettered as INTERNAL, so one poison event costs a partition a few step runs.
"""

from __future__ import annotations

import asyncio
import logging
from enum import Enum

import asyncpg
import urllib3.exceptions
from aiokafka.errors import KafkaError
from minio.error import MinioException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.serving.version_server import ServerStopped
from topics.errors import ErrorCode, EventError

log = logging.getLogger(__name__)

class VersionLoading(Exception):
    """A version this worker serves is in the registry but not loaded yet (the worker has just
    started, or the record has just arrived): the chunk waits for it, as for an outage."""


OUTAGES = (
    ServerStopped, VersionLoading, OSError, asyncio.TimeoutError, KafkaError, asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError, asyncpg.CannotConnectNowError, MinioException, urllib3.exceptions.HTTPError,
    RedisConnectionError, RedisTimeoutError,
)
MAX_MESSAGE_CHARS = 1000


class Failure(Enum):
    OUTAGE = "outage"
    BAD_EVENT = "bad_event"
    BUG = "bug"


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, EventError):
        return Failure.BAD_EVENT
    if isinstance(exc, OUTAGES):
        return Failure.OUTAGE
    return Failure.BUG


def as_event_error(exc: Exception) -> EventError:
    """The error to reject one event with: an outage is re-raised (the chunk is retried)."""
    kind = classify(exc)
    if kind is Failure.OUTAGE:
        raise exc
    if kind is Failure.BAD_EVENT:
        assert isinstance(exc, EventError)
        return exc
    log.warning("unexpected error on one event: %r", exc, exc_info=exc)
    return EventError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE_CHARS])


def backoff(failures: int, max_s: float = 10.0) -> float:
    return min(max_s, 0.5 * 2 ** min(failures, 5))
