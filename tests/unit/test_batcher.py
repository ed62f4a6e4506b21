import asyncio
import threading
import time

import pytest
from support.waiting import assert_stays, wait_for

from streams.serving.batcher import AdaptiveBatcher, BatcherStopped


def doubler(calls: list[list[int]]):
    def run(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        return [x * 2 for x in batch]

    return run


async def started(run, **kw) -> AdaptiveBatcher:
    batcher = AdaptiveBatcher(run, **{"max_batch_size": 4, "max_delay": 0.05, "max_pending": 100, **kw})
    await batcher.start()
    return batcher


async def test_results_reach_their_own_callers():
    calls: list[list[int]] = []
    batcher = await started(doubler(calls))
    try:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    finally:
        await batcher.stop()
    assert results == [i * 2 for i in range(10)]
    assert sorted(x for call in calls for x in call) == list(range(10))


async def test_size_cap_limits_every_batch():
    calls: list[list[int]] = []
    batcher = await started(doubler(calls), max_batch_size=3, max_delay=1.0)
    try:
        await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    finally:
        await batcher.stop()
    assert max(len(c) for c in calls) == 3
    assert len(calls) == 4  # 3 + 3 + 3 + 1: full batches go without waiting for the delay


async def test_delay_cap_flushes_a_partial_batch():
    calls: list[list[int]] = []
    waits: list[float] = []
    batcher = await started(doubler(calls), max_batch_size=100, max_delay=0.05,
                            observe=lambda queued, run_s, failed: waits.extend(queued))
    try:
        # Nobody else comes: the lone item runs once the delay cap is up, not when a batch fills.
        assert await asyncio.wait_for(batcher.submit(7), 5) == 14
    finally:
        await batcher.stop()
    assert calls == [[7]]
    assert waits[0] >= 0.04  # it waited for company first (the delay, less the timer's slack)


async def test_items_arriving_within_the_delay_share_a_batch():
    calls: list[list[int]] = []
    batcher = await started(doubler(calls), max_batch_size=2, max_delay=30.0)
    try:
        first = await batcher.enqueue(1)
        # The loop has taken the first item and waits for company when the second arrives.
        await wait_for(batcher._queue.empty, timeout=5, what="the first item taken from the queue")
        second = await batcher.enqueue(2)
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [2, 4]
    finally:
        await batcher.stop()
    assert calls == [[1, 2]]


async def test_a_failing_batch_reaches_every_waiter():
    def explode(batch):
        raise RuntimeError("backend down")

    batcher = await started(explode, max_batch_size=8, max_delay=0.05)
    try:
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
    finally:
        await batcher.stop()
    assert len(outcomes) == 5
    assert all(isinstance(o, RuntimeError) and "backend down" in str(o) for o in outcomes)


async def test_per_item_errors_stay_with_their_item():
    def picky(batch):
        return [ValueError(f"bad {x}") if x % 2 else x for x in batch]

    batcher = await started(picky, max_batch_size=8)
    try:
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    finally:
        await batcher.stop()
    assert outcomes[0] == 0 and outcomes[2] == 2
    assert isinstance(outcomes[1], ValueError) and isinstance(outcomes[3], ValueError)


async def test_a_wrong_result_count_fails_the_batch():
    batcher = await started(lambda batch: batch[:-1], max_batch_size=4)
    try:
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    finally:
        await batcher.stop()
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_bounded_queue_pushes_back():
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(batch):
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
        return batch

    batcher = await started(slow, max_batch_size=1, max_delay=0, max_pending=2)
    try:
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(6)]
        # one item running, two queued; the other three wait for room
        await wait_for(lambda: batcher.batch_sizes and batcher._queue.full(), timeout=5,
                       what="one item running and the queue full")
        assert not any(task.done() for task in tasks)
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == list(range(6))
    finally:
        await batcher.stop()


async def test_stop_fails_queued_waiters_and_refuses_new_items():
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(batch):
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
        return batch

    batcher = await started(slow, max_batch_size=1, max_delay=0, max_pending=10)
    tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await wait_for(lambda: batcher.batch_sizes and batcher._queue.qsize() == 2, timeout=5,
                   what="one item running, two queued")
    release.set()
    await batcher.stop()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert any(isinstance(o, BatcherStopped) for o in outcomes)
    with pytest.raises(BatcherStopped):
        await batcher.submit(1)


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError):
        AdaptiveBatcher(lambda b: b, max_batch_size=0, max_delay=0.1, max_pending=1)


async def test_a_coroutine_run_batch_is_awaited_on_the_loop():
    calls: list[list[int]] = []
    threads: set[int] = set()

    async def remote(batch: list[int]) -> list[int | BaseException]:
        threads.add(threading.get_ident())
        calls.append(list(batch))
        await asyncio.sleep(0.01)  # a network call: the loop stays free meanwhile
        return [ValueError(f"bad {x}") if x == 3 else x * 2 for x in batch]

    batcher = await started(remote, max_batch_size=4)
    try:
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)
    finally:
        await batcher.stop()
    assert threads == {threading.get_ident()}  # not in a worker thread
    assert [o for i, o in enumerate(outcomes) if i != 3] == [0, 2, 4, 8, 10]
    assert isinstance(outcomes[3], ValueError)
    assert sorted(x for call in calls for x in call) == list(range(6))


async def test_a_failing_coroutine_run_batch_reaches_every_waiter():
    async def down(batch):
        raise ConnectionError("backend down")

    batcher = await started(down, max_batch_size=8)
    try:
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    finally:
        await batcher.stop()
    assert all(isinstance(o, ConnectionError) for o in outcomes)


async def test_observe_hears_of_every_batch_with_its_waits_and_failures():
    seen: list[tuple[int, float, bool]] = []
    began = time.monotonic()

    def observe(waits: list[float], run_s: float, failed: bool) -> None:
        assert all(0 <= wait <= time.monotonic() - began for wait in waits)  # seconds, since queued
        seen.append((len(waits), run_s, failed))

    def run(batch: list[int]) -> list[int]:
        if 99 in batch:
            raise RuntimeError("backend down")
        time.sleep(0.01)
        return batch

    batcher = await started(run, max_batch_size=4, max_delay=0.2, observe=observe)
    try:
        assert await asyncio.gather(*(batcher.submit(i) for i in range(8))) == list(range(8))
        with pytest.raises(RuntimeError):
            await batcher.submit(99)
    finally:
        await batcher.stop()
    assert [(size, failed) for size, _, failed in seen] == [(4, False), (4, False), (1, True)]
    assert all(run_s >= 0.009 for _, run_s, failed in seen if not failed)


async def test_a_chunk_marked_last_runs_at_once_and_a_lone_item_waits_for_company():
    calls: list[list[int]] = []
    batcher = await started(doubler(calls), max_delay=30.0)
    try:
        futures = [await batcher.enqueue(i, last=i == 5) for i in range(6)]
        # 4 and 2: the partial batch ends with the chunk's last item, so it does not wait 30 s.
        assert await asyncio.wait_for(asyncio.gather(*futures), 5) == [0, 2, 4, 6, 8, 10]
        assert calls == [[0, 1, 2, 3], [4, 5]]
        lone = await batcher.enqueue(7)
        await assert_stays(lambda: not lone.done(), for_s=0.2,
                           what="an unmarked item with nobody else queued waits for the delay")
        company = await batcher.enqueue(8, last=True)
        assert await asyncio.wait_for(asyncio.gather(lone, company), 5) == [14, 16]
    finally:
        await batcher.stop()
