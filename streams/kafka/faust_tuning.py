"""Faust's per-event costs that no setting removes, cut by subclassing rather than by editing the
installed package (README, "What is tuned in Faust and why").

- **Drain loop** (`EagerDrain`): faust's `Consumer._drain_messages` hands each fetched record to
  the conductor with `await self.wait_first(callback(message), self.suspend_flow.wait())`: four
  tasks, an `asyncio.wait` and their cancellations per event, so that a callback blocked on a full
  stream buffer (or on flow control) is given up when the flow is suspended for a rebalance, or
  the consumer stops or crashes. Here the callback is first run in place, up to its first wait: a
  callback that finishes without waiting (the usual case: the record goes into the stream's
  buffer) has cost one coroutine and no task. Only a callback that has to wait is handed, where
  it waits, to faust's own `wait_first` race, exactly as faust would: suspension, stop and crash
  still interrupt it. Faust's `wait_first` also runs the callback's first step before it can see
  the suspension, so what is delivered is the same.
- **Monitor** (`LeanMonitor`): faust's default sensor records statistics on every event
  (received, active, per-stream and per-task counts, timings) for its web views, which the worker
  does not serve (`web_enabled=False`; the project's metrics are `streams.telemetry.metrics`). The one
  per-event figure faust itself reads is kept: when a partition's stream last took an event, which
  the consumer's livelock check compares with the broker's high watermark.

- **Start and stop** (`LeanTableManager`, `QuickExitWorker`): faust's table manager sleeps 1 s
  when it starts, for agents to add tables, before the consumer subscribes; the worker defines
  no tables. At exit, mode's worker runs its loop 1 s more (`_sentinel_task`) after every task
  has been gathered. Each start (scale-out, restart, rolling deploy) and each stop is a second
  shorter.

Logging needs no code here: `run_worker` keeps faust from installing its terminal spinner, which
would set the root logger to DEBUG and have every `logger.debug` in faust and aiokafka build a
record (the root logger stays at `settings.log_level`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import types
from collections.abc import AsyncIterator, Awaitable, Coroutine, Generator
from time import monotonic
from typing import Any, cast

import faust
from faust.sensors.monitor import Monitor
from faust.tables import TableManager
from faust.transport import consumer as faust_consumer
from faust.transport.consumer import CONSUMER_FETCHING
from faust.types import TP, EventT, Message, StreamT
from faust.types.transports import TransportT
from mode import Service, ServiceT

# The faust-streaming release `EagerDrain._drain_messages` was copied from, and the SHA-256 of that
# release's `Consumer._drain_messages` source. `tests/unit/test_faust_tuning.py` fails when either
# differs from what is installed: compare the new method with the copy, carry its changes over,
# then update both.
FAUST_VERSION = "0.15.3"
DRAIN_SOURCE_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"
# Likewise for `TableManager.on_start`, which `LeanTableManager.on_start` repeats without its sleep.
TABLES_START_SOURCE_SHA256 = "365dd25fbc0e068499c89e526516c638693a2d143b6ac249f84a60f5267fec9d"


def source_sha256(function: Any) -> str:
    """The SHA-256 of the installed source of `function`."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def drain_source_sha256() -> str:
    """The SHA-256 of the installed faust's `Consumer._drain_messages` source."""
    return source_sha256(faust_consumer.Consumer._drain_messages)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """Go on with a coroutine that was stepped by hand and yielded `waiting_on` (what it awaits):
    hand that to the task, and pass the task's answers and exceptions (a cancellation) back in."""
    while True:
        try:
            answer = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - the task throws it into the coroutine
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting_on = coro.send(answer)
            except StopIteration as done:
                return done.value


async def _finish(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    return await _resume(coro, waiting_on)


def run_until_wait(awaitable: Awaitable[Any]) -> Awaitable[Any] | None:
    """Run a coroutine in place until it finishes (None) or has to wait: then an awaitable that
    goes on with it from where it waits, to be awaited (or raced, or cancelled) like the coroutine
    itself. Any other awaitable is returned as it is."""
    if not isinstance(awaitable, Coroutine):
        return awaitable
    coro = awaitable
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        return None
    return _finish(coro, waiting_on)


class EagerDrain(faust_consumer.Consumer):
    """A faust consumer whose drain loop runs the conductor's callback in place (see the module's
    docstring). Mixed into the transport's own consumer class by `tune_transport`."""

    # Copied from faust-streaming 0.15.3 (faust/transport/consumer.py, Consumer._drain_messages,
    # BSD-3-Clause); the one change is marked.
    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover
        # This is the background thread started by Fetcher, used to
        # constantly read messages using Consumer.getmany.
        # It takes Fetcher as argument, because we must be able to
        # stop it using `await Fetcher.stop()`.
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for

        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                ait = cast(AsyncIterator, getmany(timeout=1.0))

                # Sleeping because sometimes getmany is called in a loop
                # never releasing to the event loop
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0

                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            # We have a gap in income messages
                            if gap > 1 and r_offset:
                                acks_enabled = acks_enabled_for(message.topic)
                                if acks_enabled:
                                    await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None:
                                if self._n_acked >= commit_every:
                                    self._n_acked = 0
                                    await self.commit()
                            # inferstream: the callback runs in place; only if it has to wait is
                            # the rest raced against the suspension, as faust does for all of it.
                            # (was: await self.wait_first(callback(message), self.suspend_flow.wait()))
                            rest = run_until_wait(callback(message))
                            if rest is not None:
                                await self.wait_first(rest, self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev(
                                "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                                offset,
                                message.key,
                                message.value,
                            )
                    unset_flag(flag_consumer_fetching)

        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)


@functools.cache
def eager_drain(consumer_class: type) -> type:
    """`consumer_class` with `EagerDrain`'s drain loop."""
    if issubclass(consumer_class, EagerDrain):
        return consumer_class
    return type(f"EagerDrain{consumer_class.__name__}", (EagerDrain, consumer_class), {"__module__": __name__})


def tune_transport(transport: TransportT) -> TransportT:
    """Have `transport` create consumers with `EagerDrain`'s drain loop."""
    # An instance attribute: the transport class (and any other app's) stays as it is.
    setattr(transport, "Consumer", eager_drain(transport.Consumer))
    return transport


class LeanMonitor(Monitor):
    """Faust's monitor without its per-event statistics: of what it records per event, only when a
    partition's stream last took one (`stream_inbound_time`, read by faust's livelock check)."""

    def on_message_in(self, tp: TP, offset: int, message: Message) -> None:
        pass

    def on_stream_event_in(self, tp: TP, offset: int, stream: StreamT, event: EventT) -> dict | None:
        self.stream_inbound_time[tp] = monotonic()
        return None

    def on_stream_event_out(self, tp: TP, offset: int, stream: StreamT, event: EventT,
                            state: dict | None = None) -> None:
        pass

    def on_message_out(self, tp: TP, offset: int, message: Message) -> None:
        pass


class LeanTableManager(TableManager):
    """Faust's table manager without the 1 s sleep that starts `on_start`: it waits for agents to
    add tables, and the worker has none, so its consumer subscribes a second earlier."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class QuickExitWorker(faust.Worker):
    """A faust worker whose loop, once every task has been gathered at exit, runs one more
    iteration (mode runs it for 1 s) before it closes."""

    async def _sentinel_task(self) -> None:
        await asyncio.sleep(0)
