"""Topic names, partition counts and retention: the one place that defines them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

_VALID = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int
    compacted: bool = False  # keep the latest record per key, forever


def valid_topic(name: str) -> bool:
    return bool(_VALID.match(name))


class TopicSizing(Protocol):
    """Partition counts and retentions (the settings object has them)."""

    request_partitions: int
    reply_partitions: int
    result_partitions: int
    deadletter_partitions: int
    model_partitions: int
    request_retention_ms: int
    reply_retention_ms: int
    result_retention_ms: int
    deadletter_retention_ms: int


class Topics:
    """Every topic name, from one prefix (`INFERSTREAM_TOPIC_PREFIX`)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.requests = f"{prefix}.requests"
        self.replies = f"{prefix}.replies"
        self.results = f"{prefix}.results"
        self.deadletter = f"{prefix}.deadletter"
        self.batches = f"{prefix}.batches"  # batch job commands (key: batch id)
        self.registry = f"{prefix}.registry"  # model version records (key: name/version)

    def bridge_replies(self, instance: str) -> str:
        """The reply topic of one bridge instance: it alone reads it."""
        return f"{self.prefix}.replies.bridge.{instance}"

    def model(self, name: str) -> str:
        """The per-model topic the intake routes validated requests to."""
        return f"{self.prefix}.model.{name}"

    def specs(self, models: list[str], s: TopicSizing) -> list[TopicSpec]:
        return [
            TopicSpec(self.requests, s.request_partitions, s.request_retention_ms),
            TopicSpec(self.replies, s.reply_partitions, s.reply_retention_ms),
            TopicSpec(self.results, s.result_partitions, s.result_retention_ms),
            TopicSpec(self.deadletter, s.deadletter_partitions, s.deadletter_retention_ms),
            TopicSpec(self.batches, s.request_partitions, s.request_retention_ms),
            TopicSpec(self.registry, 1, -1, compacted=True),
            *(TopicSpec(self.model(m), s.model_partitions, s.request_retention_ms) for m in models),
        ]
