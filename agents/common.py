"""Glue shared by the agents: Faust events to plain messages, and an outbox on Faust's producer."""

from __future__ import annotations

from collections.abc import Sequence

import faust

from streams.pipeline import Headers, Message, Outbox


def to_messages(batch: Sequence[faust.EventT]) -> list[Message]:
    out = []
    for event in batch:
        m = event.message
        headers = list(m.headers.items()) if isinstance(m.headers, dict) else list(m.headers or [])
        out.append(Message(m.value, m.key, m.topic, m.partition, m.offset, headers))
    return out


def outbox(app: faust.App) -> Outbox:
    async def send(topic: str, key: bytes | None, value: bytes, headers: Headers | None):
        # The producer's own future: appended to its batches now, confirmed on flush.
        return await app.producer.send(topic, key, value, None, None, headers)

    return Outbox(send)
