"""Waiting in tests: poll for the condition itself, with a deadline, instead of sleeping for a
guess of how long it takes; and negative checks ("nothing happens for a while") named as such."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

Condition = Callable[[], "T | Awaitable[T]"]


async def _check(condition: Condition[T]) -> T:
    value = condition()
    return await value if inspect.isawaitable(value) else value


async def wait_for(condition: Condition[T], *, timeout: float, interval: float = 0.05, what: str,
                   until: Callable[[T], object] = bool) -> T:
    """Call `condition` (a function, plain or async) every `interval` seconds until what it
    answers passes `until` (is truthy, by default), and return that answer. Past `timeout`
    seconds, raise TimeoutError naming `what` and the last answer. An exception from `condition`
    propagates at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = await _check(condition)
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s (last: {value!r:.2000})")
        await asyncio.sleep(interval)


def wait_for_sync(condition: Callable[[], T], *, timeout: float, interval: float = 0.05, what: str,
                  until: Callable[[T], object] = bool) -> T:
    """`wait_for` for tests that run no event loop (subprocesses, files)."""
    return asyncio.run(wait_for(condition, timeout=timeout, interval=interval, what=what, until=until))


async def assert_stays(condition: Condition[object], *, for_s: float, interval: float = 0.05, what: str) -> None:
    """A negative check, bounded by nature: `condition` holds at every check for `for_s` seconds
    (something that must not happen does not happen that soon). Keep `for_s` short."""
    deadline = time.monotonic() + for_s
    while True:
        value = await _check(condition)
        assert value, f"{what}: no longer so (got {value!r:.2000})"
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(interval)
