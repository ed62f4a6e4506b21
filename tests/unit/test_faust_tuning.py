"""The Faust tuning (`streams.kafka.faust_tuning`): the drain loop copied from faust still matches the
installed faust, differs from it in the one marked change, hands records over without a task per
record, and still gives up a callback blocked on a full buffer when a rebalance suspends the flow,
as faust's own loop does. A real Faust consumer object, never started; no broker, nothing timed
(each wait is bounded)."""

from __future__ import annotations

import asyncio
import difflib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP

from streams.kafka.faust_tuning import (
    DRAIN_SOURCE_SHA256,
    FAUST_VERSION,
    TABLES_START_SOURCE_SHA256,
    EagerDrain,
    LeanMonitor,
    LeanTableManager,
    QuickExitWorker,
    drain_source_sha256,
    eager_drain,
    run_until_wait,
    source_sha256,
    tune_transport,
)
from streams.kafka.transport import broker_url
from streams.settings import Settings

BOUND_S = 10.0  # every wait in these tests; none should come near it
TOPIC = "t"
PROCESSED = "EagerDrain._drain_messages copies faust's Consumer._drain_messages"


def test_the_installed_faust_is_the_release_the_drain_loop_was_copied_from() -> None:
    assert version("faust-streaming") == FAUST_VERSION, (
        f"faust-streaming {version('faust-streaming')} is installed; {PROCESSED} from {FAUST_VERSION}: "
        "compare the two, carry faust's changes over, then update FAUST_VERSION and DRAIN_SOURCE_SHA256")
    assert drain_source_sha256() == DRAIN_SOURCE_SHA256, (
        f"faust's Consumer._drain_messages changed; {PROCESSED}: carry the changes over, then update "
        "DRAIN_SOURCE_SHA256")
    assert (inspect.signature(EagerDrain._drain_messages, eval_str=True)
            == inspect.signature(FaustConsumer._drain_messages, eval_str=True))


def test_the_copy_differs_from_faust_only_in_how_the_callback_is_awaited() -> None:
    theirs = inspect.getsource(FaustConsumer._drain_messages).splitlines()
    ours = inspect.getsource(EagerDrain._drain_messages).splitlines()
    diff = list(difflib.unified_diff(theirs, ours, lineterm="", n=0))[2:]  # without the file names
    removed = [line[1:].strip() for line in diff if line.startswith("-")]
    added = [line[1:].strip() for line in diff if line.startswith("+")]
    assert removed == ["await self.wait_first(", "callback(message), self.suspend_flow.wait()", ")"]
    assert [line for line in added if not line.startswith("#")] == [
        "rest = run_until_wait(callback(message))",
        "if rest is not None:",
        "await self.wait_first(rest, self.suspend_flow.wait())",
    ]


# -- run_until_wait ---------------------------------------------------------------------------


async def test_a_coroutine_that_does_not_wait_runs_to_its_end_in_place() -> None:
    seen: list[int] = []

    async def body() -> None:
        seen.append(1)

    assert run_until_wait(body()) is None
    assert seen == [1]


async def test_a_coroutine_that_waits_goes_on_where_it_waits_with_what_it_awaited() -> None:
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    steps: list[object] = []

    async def body() -> str:
        steps.append("start")
        steps.append(await first)
        await asyncio.sleep(0)  # a bare yield, too
        steps.append(await second)
        return "done"

    rest = run_until_wait(body())
    assert rest is not None and steps == ["start"]
    task = asyncio.ensure_future(rest)
    first.set_result("a")
    await asyncio.sleep(0)
    second.set_result("b")
    assert await asyncio.wait_for(task, BOUND_S) == "done"
    assert steps == ["start", "a", "b"]


async def test_cancelling_the_rest_cancels_the_coroutine_where_it_waits() -> None:
    blocked: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
    blocked.put_nowait(0)
    cleaned_up = asyncio.Event()

    async def body() -> None:
        try:
            await blocked.put(1)  # the queue is full: waits
        finally:
            cleaned_up.set()

    rest = run_until_wait(body())
    assert rest is not None
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, BOUND_S)
    assert cleaned_up.is_set()
    assert blocked.qsize() == 1  # the put never happened
    assert not blocked._putters  # type: ignore[attr-defined]  # and left no waiter behind


async def test_an_error_raised_before_or_after_the_first_wait_comes_out() -> None:
    async def early() -> None:
        raise ValueError("early")

    with pytest.raises(ValueError, match="early"):
        run_until_wait(early())

    async def late() -> None:
        await asyncio.sleep(0)
        raise ValueError("late")

    rest = run_until_wait(late())
    assert rest is not None
    with pytest.raises(ValueError, match="late"):
        await asyncio.wait_for(rest, BOUND_S)


# -- the drain loop, against faust's own ------------------------------------------------------


class Message:
    def __init__(self, offset: int) -> None:
        self.topic, self.partition, self.offset = TOPIC, 0, offset
        self.tp = TP(TOPIC, 0)
        self.key = self.value = b""


def consumer_of(stock: bool) -> Any:
    """The worker's consumer class (or faust's own drain loop on the same class), never started."""
    app = faust.App(f"tuning-{id(object())}", broker=broker_url("127.0.0.1:9", 100),
                    loop=asyncio.get_running_loop())
    transport = app.transport if stock else tune_transport(app.transport)

    async def nothing(*args: Any) -> None:
        pass

    return transport.create_consumer(callback=nothing, on_partitions_revoked=nothing, on_partitions_assigned=nothing)


def fetching(consumer: Any, records: int, stop: asyncio.Event) -> Callable[..., AsyncIterator[tuple[TP, Message]]]:
    """A stand-in for `Consumer.getmany`: `records` records once, then nothing until `stop`; like
    faust's, it yields nothing more once the flow is suspended."""
    fetched = False

    async def getmany(timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        nonlocal fetched
        if fetched:
            await asyncio.wait_for(stop.wait(), BOUND_S)
            return
        fetched = True
        for offset in range(records):
            if not consumer.flow_active:
                break
            yield TP(TOPIC, 0), Message(offset)

    return getmany


async def drain(consumer: Any, records: int, callback: Callable[[Message], Awaitable[None]],
                until: Callable[[], Awaitable[None]]) -> None:
    """Run the consumer's drain loop over `records` records until `until()` returns, then stop it."""
    stop = asyncio.Event()
    consumer.getmany = fetching(consumer, records, stop)
    consumer.callback = callback
    fetcher = faust.Service()
    loop = asyncio.create_task(consumer._drain_messages(fetcher))
    try:
        await asyncio.wait_for(until(), BOUND_S)
    finally:
        fetcher._stopped.set()
        stop.set()
        await asyncio.wait_for(loop, BOUND_S)


@pytest.mark.parametrize("stock", [True, False], ids=["faust", "tuned"])
async def test_records_are_handed_over_in_order_and_the_tuned_loop_starts_no_task_per_record(stock: bool) -> None:
    consumer, delivered, tasks = consumer_of(stock), [], 0
    records = 500
    assert isinstance(consumer, EagerDrain) is not stock
    loop = asyncio.get_running_loop()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        nonlocal tasks
        tasks += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def callback(message: Message) -> None:
        delivered.append(message.offset)

    async def all_delivered() -> None:
        while len(delivered) < records:
            await asyncio.sleep(0)

    loop.set_task_factory(counting)
    try:
        await drain(consumer, records, callback, all_delivered)
    finally:
        loop.set_task_factory(None)
    assert delivered == list(range(records))
    assert consumer._read_offset[TP(TOPIC, 0)] == records - 1
    if stock:
        assert tasks >= 4 * records  # the callback, the suspension, stop and crash, per record
    else:
        assert tasks < 10


@pytest.mark.parametrize("stock", [True, False], ids=["faust", "tuned"])
async def test_a_rebalance_gives_up_a_callback_blocked_on_a_full_buffer(stock: bool) -> None:
    """The stream's buffer is full and nothing reads it (the agent waits for the rebalance): the
    suspension must free the drain loop, the record not delivered, the loop still running."""
    consumer = consumer_of(stock)
    buffer: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
    buffer.put_nowait(-1)
    attempted: list[int] = []
    gave_up = asyncio.Event()

    async def callback(message: Message) -> None:
        attempted.append(message.offset)
        try:
            await buffer.put(message.offset)
        except asyncio.CancelledError:
            gave_up.set()
            raise

    async def rebalance() -> None:
        while not attempted:
            await asyncio.sleep(0)
        consumer.stop_flow()  # what faust's on_partitions_revoked does first
        await gave_up.wait()

    await drain(consumer, 3, callback, rebalance)
    assert attempted == [0]  # the others were not fetched: the flow is suspended
    assert list(buffer._queue) == [-1]  # type: ignore[attr-defined]


@pytest.mark.parametrize("stock", [True, False], ids=["faust", "tuned"])
async def test_stopping_the_consumer_gives_up_a_blocked_callback(stock: bool) -> None:
    consumer = consumer_of(stock)
    blocked = asyncio.Event()
    gave_up = asyncio.Event()

    async def callback(message: Message) -> None:
        blocked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            gave_up.set()
            raise

    async def stop_consumer() -> None:
        await blocked.wait()
        consumer._stopped.set()  # what Service.stop does first
        await gave_up.wait()

    await drain(consumer, 1, callback, stop_consumer)


# -- the monitor ------------------------------------------------------------------------------


def test_the_lean_monitor_keeps_only_when_a_stream_last_took_an_event() -> None:
    monitor = LeanMonitor()
    tp = TP(TOPIC, 0)
    message: Any = Message(0)
    monitor.on_message_in(tp, 0, message)
    assert monitor.on_stream_event_in(tp, 0, None, None) is None  # type: ignore[arg-type]
    monitor.on_stream_event_out(tp, 0, None, None, None)  # type: ignore[arg-type]
    monitor.on_message_out(tp, 0, message)
    assert set(monitor.stream_inbound_time) == {tp}  # read by faust's livelock check
    assert monitor.messages_received_total == monitor.events_total == 0
    assert not hasattr(message, "time_in")


def test_the_table_manager_start_is_faust_s_without_its_sleep() -> None:
    from faust.tables import TableManager

    assert source_sha256(TableManager.on_start) == TABLES_START_SOURCE_SHA256, (
        "faust's TableManager.on_start changed: carry the changes over to LeanTableManager.on_start, then "
        "update TABLES_START_SOURCE_SHA256")
    def code(function: Any) -> list[str]:
        return [line.strip() for line in inspect.getsource(function).splitlines() if '"""' not in line]

    theirs, ours = code(TableManager.on_start), code(LeanTableManager.on_start)
    assert [line for line in theirs if line not in ours] == ["await self.sleep(1.0)"]
    assert ours[-1:] == theirs[-1:] == ["await self.recovery.start()"]


async def test_the_quick_exit_worker_runs_its_loop_once_more_without_waiting(monkeypatch) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float, *args: Any) -> Any:
        waits.append(delay)
        return await real_sleep(0, *args)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    await QuickExitWorker._sentinel_task(None)  # type: ignore[arg-type]
    assert waits == [0]


@pytest.mark.parametrize(("session_s", "heartbeat_s"), [(6.0, 1.0), (2.0, 2 / 3)])
async def test_the_worker_app_uses_the_tuned_consumer_monitor_tables_and_session(
        tmp_path: Path, session_s: float, heartbeat_s: float) -> None:
    from agents import register_agents
    from streams.worker.app import create_app

    app, _ = create_app(Settings(state_dir=tmp_path, kafka_session_timeout_s=session_s), ["tiny"], register_agents)
    assert isinstance(app.consumer, EagerDrain)
    assert isinstance(app.monitor, LeanMonitor)
    assert isinstance(app.tables, LeanTableManager)
    assert eager_drain(eager_drain(type(app.consumer))) is type(app.consumer)
    assert app.conf.broker_session_timeout == session_s
    assert app.conf.broker_heartbeat_interval == pytest.approx(heartbeat_s)
