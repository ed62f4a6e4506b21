"""A load target for the load generator's tests: answers at once, no network."""

from __future__ import annotations

import asyncio

from streams.ops import load


class InstantTarget:
    """Answers every request at once; every `error_every`-th one (counting from 1) with an error
    (0: none). Takes and ignores the real targets' constructor arguments, so it can stand in for
    them."""

    specs = ()
    error_every = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    async def __aenter__(self) -> InstantTarget:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, index: int) -> load.Reply:
        await asyncio.sleep(0)  # yields like a real send
        failed = self.error_every and index % self.error_every == self.error_every - 1
        return load.Reply(load.ERROR if failed else load.OK, "X")
