"""What every benchmark does around its measurements: run servers, show their log tails when
something fails, and clean up (stop by PID, stack down, database dropped) however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import Protocol

from rich.console import Console

from infra.local.harness import drop_database
from infra.local.stack import LocalStack
from streams.settings import Settings

LOG_TAIL_CHARS = 3000


class Server(Protocol):
    proc: object

    def stop(self) -> None: ...

    def log(self) -> str: ...


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """A second Ctrl-C must not cut a cleanup short (every step of one is bounded)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stopped_after(console: Console, *servers: Server) -> Iterator[None]:
    """The servers are stopped when the block ends; their log tails are shown if it fails."""
    try:
        yield
    except Exception:
        for server in servers:
            if server.proc is not None:
                console.print(f"{type(server).__name__} log tail:\n{server.log()[-LOG_TAIL_CHARS:]}")
        raise
    finally:
        with signals_ignored():
            for server in reversed(servers):
                server.stop()


@contextlib.contextmanager
def private_stack(settings: Settings, console: Console, *servers: Server) -> Iterator[None]:
    """The local stack of `settings` up for the block, with `servers` as in `stopped_after`; then
    the stack down and its database dropped."""
    stack = LocalStack(settings)
    try:
        with stopped_after(console, *servers):
            stack.up()
            yield
    finally:
        with signals_ignored():
            stack.down()
            with contextlib.suppress(OSError):  # PostgreSQL down: up() failed and said so
                asyncio.run(drop_database(settings.postgres_dsn))
