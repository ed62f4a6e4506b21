"""A consumed Kafka record, as every stage receives it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from streams.kafka.outbox import Headers

log = logging.getLogger(__name__)


@dataclass
class Message:
    """A consumed Kafka record."""

    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int
    headers: Headers = field(default_factory=list)
    timestamp_ms: int | None = None  # when it was produced

    @property
    def source(self) -> str:
        """Where it was read: one admission per place, however often it is redelivered."""
        return f"{self.topic}:{self.partition}:{self.offset}"
