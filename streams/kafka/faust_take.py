"""Faust's `Stream.take_events` without its idle ticks.

Faust's `take_events(max_, within)` waits for its buffer to fill with a timeout of `within`, in
a loop, whether or not anything is buffered: an agent that takes with `within=0.005` (intake and
inference, `max_batch_delay_ms`) wakes 200 times a second with nothing to do, and each wake goes
through mode's `wait_first` (tasks created and cancelled). With four such agents an idle worker
kept ~0.1 cores busy (`bench/idle.py`).

`IdleFreeStream.take_events` is faust's, with one change: while its buffer is empty it waits,
without a timeout, for the first event (or the stream to stop). Once an event is buffered it waits
until the buffer is full or until the tick at which faust's loop would have given it up (the
ticks run every `within` from the end of the previous chunk, as in faust's loop), so chunks and
their latency are the same as faust's, and acknowledgements, stop and crash behave as in faust.
The worker's app makes its streams of this class (`Stream=` in `streams.worker.app`).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from asyncio import CancelledError
from typing import AsyncGenerator, List, Optional, Sequence, cast

import faust
from faust.streams import T, T_co, _tracks_buffer_agen
from faust.types import ChannelT, EventT
from mode import Seconds, want_seconds
from mode.utils.aiter import aiter
from mode.utils.futures import notify

# The faust-streaming release `IdleFreeStream.take_events` was copied from, and the SHA-256 of that
# release's `Stream.take_events` source. `tests/unit/test_faust_take.py` fails when either differs
# from what is installed: compare the new method with the copy, carry its changes over, then update
# both.
FAUST_VERSION = "0.15.3"
TAKE_EVENTS_SOURCE_SHA256 = "607d48aead118ba8ea868718a0df87de1c5fcecd10ec542c659b448796728e08"


def take_events_source_sha256() -> str:
    """The SHA-256 of the installed faust's `Stream.take_events` source."""
    return hashlib.sha256(inspect.getsource(faust.Stream.take_events).encode()).hexdigest()


class IdleFreeStream(faust.Stream[T_co]):
    """A faust Stream whose `take_events` does not wake while nothing is buffered."""

    # Copied from faust-streaming 0.15.3 (faust/streams.py, Stream.take_events, BSD-3-Clause);
    # the changes are marked.
    @_tracks_buffer_agen
    async def take_events(
        self, max_: int, within: Seconds
    ) -> AsyncGenerator[Sequence[EventT], None]:
        """Buffer n events at a time and yield a list of buffered events.
        Arguments:
            max_: Max number of messages to receive. When more than this
                number of messages are received within the specified number of
                seconds then we flush the buffer immediately.
            within: Timeout for when we give up waiting for another value,
                and process the values we have.
                Warning: If there's no timeout (i.e. `timeout=None`),
                the agent is likely to stall and block buffered events for an
                unreasonable length of time(!).
        """
        buffer: List[T_co] = []
        events: List[EventT] = []
        buffer_add = buffer.append
        event_add = events.append
        buffer_size = buffer.__len__
        buffer_full = asyncio.Event()
        buffer_consumed = asyncio.Event()
        buffered = asyncio.Event()  # changed: set by a chunk's first event
        timeout = want_seconds(within) if within else None
        stream_enable_acks: bool = self.enable_acks

        buffer_consuming: Optional[asyncio.Future] = None

        channel_it = aiter(self.channel)

        # We add this processor to populate the buffer, and the stream
        # is passively consumed in the background (enable_passive below).
        async def add_to_buffer(value: T) -> T:
            try:
                # buffer_consuming is set when consuming buffer after timeout.
                nonlocal buffer_consuming
                if buffer_consuming is not None:
                    try:
                        await buffer_consuming
                    finally:
                        buffer_consuming = None
                buffer_add(cast(T_co, value))
                buffered.set()  # changed
                event = self.current_event
                if event is None:
                    raise RuntimeError("Take buffer found current_event is None")
                event_add(event)
                if buffer_size() >= max_:
                    # signal that the buffer is full and should be emptied.
                    buffer_full.set()
                    # strict wait for buffer to be consumed after buffer full.
                    # If max is 1000, we are not allowed to return 1001 values.
                    buffer_consumed.clear()
                    # mode types the waitable as ``mode.utils.locks.Event``,
                    # but Service.wait_first accepts anything with an
                    # awaitable ``.wait()`` -- asyncio.Event included.
                    await self.wait(buffer_consumed)  # type: ignore[arg-type]
            except CancelledError:  # pragma: no cover
                raise
            except Exception as exc:
                self.log.exception("Error adding to take buffer: %r", exc)
                await self.crash(exc)
            return value

        # Disable acks to ensure this method acks manually
        # events only after they are consumed by the user
        self.enable_acks = False

        self.add_processor(add_to_buffer)
        self._enable_passive(cast(ChannelT, channel_it))
        ticks_from = self.loop.time()  # changed: where faust's ticks of `within` start
        try:
            while not self.should_stop:
                # changed: with nothing buffered, wait for the first event (or the stream to
                # stop) without a timeout, then until faust's next tick.
                wait = timeout
                if not buffer:
                    await self.wait_for_stopped(buffered)  # type: ignore[arg-type]
                    if not buffer:
                        continue
                    if timeout is not None:
                        wait = timeout - (self.loop.time() - ticks_from) % timeout
                # wait until buffer full, or timeout.
                # Same mode annotation gap as in add_to_buffer above, plus
                # ``timeout: Seconds`` omitting the ``None`` that is mode's
                # own default and its "wait forever" value.
                await self.wait_for_stopped(
                    buffer_full, timeout=wait  # type: ignore[arg-type]  # changed: wait
                )
                if buffer:
                    # make sure background thread does not add new items to
                    # buffer while we read.
                    buffer_consuming = self.loop.create_future()
                    try:
                        yield list(events)
                    finally:
                        buffer.clear()
                        buffered.clear()  # changed
                        for event in events:
                            await self.ack(event)
                        events.clear()
                        # allow writing to buffer again
                        notify(buffer_consuming)
                        buffer_full.clear()
                        buffer_consumed.set()
                        ticks_from = self.loop.time()  # changed
                else:  # pragma: no cover
                    pass
            else:  # pragma: no cover
                pass

        finally:
            # Restore last behaviour of "enable_acks"
            self.enable_acks = stream_enable_acks
            self._processors.remove(add_to_buffer)
