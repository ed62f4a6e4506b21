"""Dead letters of given requests, read from the dead-letter topic as they arrive."""

from __future__ import annotations

from streams.ops.dlq import Letter, read_letters
from streams.settings import Settings
from support.waiting import wait_for


async def dead_letters_of(settings: Settings, request_ids: set[str | None],
                          timeout: float = 60.0) -> dict[str | None, Letter]:
    """The dead letter of each of these requests, by request id, once every one has one (None:
    the letter of an event without a readable request id)."""

    async def found() -> dict[str | None, Letter]:
        return {r.letter.request_id: r for r in await read_letters(settings)
                if isinstance(r, Letter) and r.letter.request_id in request_ids}

    return await wait_for(found, timeout=timeout, interval=0.3, until=lambda letters: set(letters) == request_ids,
                          what=f"dead letters of {request_ids}")
