"""`streams.kafka.faust_take`: the take_events copied from faust still matches the installed faust,
differs from it only in the marked lines, and with nothing buffered waits without a timeout where
faust's wakes every `within`. No broker; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import inspect
from importlib.metadata import version

import faust

from streams.kafka.faust_take import (
    FAUST_VERSION,
    TAKE_EVENTS_SOURCE_SHA256,
    IdleFreeStream,
    take_events_source_sha256,
)

COPIED = "IdleFreeStream.take_events copies faust's Stream.take_events"


def test_the_installed_faust_is_the_release_take_events_was_copied_from() -> None:
    assert version("faust-streaming") == FAUST_VERSION, (
        f"faust-streaming {version('faust-streaming')} is installed; {COPIED} from {FAUST_VERSION}: "
        "compare the two, carry faust's changes over, then update FAUST_VERSION and TAKE_EVENTS_SOURCE_SHA256")
    assert take_events_source_sha256() == TAKE_EVENTS_SOURCE_SHA256, (
        f"faust's Stream.take_events changed; {COPIED}: carry the changes over, then update "
        "TAKE_EVENTS_SOURCE_SHA256")


def test_the_copy_differs_from_faust_only_in_the_marked_lines() -> None:
    theirs = inspect.getsource(faust.Stream.take_events).splitlines()
    ours = inspect.getsource(IdleFreeStream.take_events).splitlines()
    diff = list(difflib.unified_diff(theirs, ours, lineterm="", n=0))[2:]
    removed = [line[1:].strip() for line in diff if line.startswith("-")]
    added = [line[1:].strip() for line in diff if line.startswith("+")]
    assert removed == ["buffer_full, timeout=timeout  # type: ignore[arg-type]"]
    assert [line for line in added if not line.startswith("#")] == [
        "buffered = asyncio.Event()  # changed: set by a chunk's first event",
        "buffered.set()  # changed",
        "ticks_from = self.loop.time()  # changed: where faust's ticks of `within` start",
        "wait = timeout",
        "if not buffer:",
        "await self.wait_for_stopped(buffered)  # type: ignore[arg-type]",
        "if not buffer:",
        "continue",
        "if timeout is not None:",
        "wait = timeout - (self.loop.time() - ticks_from) % timeout",
        "buffer_full, timeout=wait  # type: ignore[arg-type]  # changed: wait",
        "buffered.clear()  # changed",
        "ticks_from = self.loop.time()  # changed",
    ]


async def first_wait(stream_class: type) -> tuple[object, object]:
    """What an idle `take_events(10, within=0.005)` first waits on, and with which timeout."""
    app = faust.App(f"take-{id(object())}", broker="memory://", Stream=stream_class)
    stream = app.channel().stream()
    assert isinstance(stream, stream_class)
    waited = asyncio.get_running_loop().create_future()

    async def recording(*waitables, timeout=None):
        if not waited.done():
            waited.set_result((waitables, timeout))
        await asyncio.Event().wait()  # forever: the test cancels it

    stream.wait_for_stopped = recording  # type: ignore[method-assign]

    async def take() -> None:
        async for _ in stream.take_events(10, within=0.005):
            pass

    task = asyncio.create_task(take())
    try:
        waitables, timeout = await asyncio.wait_for(waited, 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return waitables[0], timeout


async def test_with_nothing_buffered_it_waits_for_an_event_without_a_timeout() -> None:
    _, timeout = await first_wait(IdleFreeStream)
    assert timeout is None
    _, timeout = await first_wait(faust.Stream)  # faust's loop wakes every `within`
    assert timeout == 0.005


def test_the_worker_app_makes_its_streams_idle_free(tmp_path) -> None:
    from agents import register_agents
    from streams.settings import Settings
    from streams.worker.app import create_app

    settings = Settings(state_dir=tmp_path, kafka_bootstrap="127.0.0.1:9")
    app, _ = create_app(settings, ["tiny"], register_agents)
    assert app.conf.Stream is IdleFreeStream
