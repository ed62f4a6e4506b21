"""Where a step's events go: sends collected during the step, confirmed together before the
step's input is acknowledged (at-least-once)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Headers = list[tuple[str, bytes]]
Send = Callable[[str, bytes | None, bytes, Headers | None], Awaitable[Awaitable[object]]]


class Outbox:
    """Collects produce futures; `flush` waits until the broker confirmed every send."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._pending: list[Awaitable[object]] = []

    async def put(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> None:
        self._pending.append(await self._send(topic, key, value, headers))

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)
