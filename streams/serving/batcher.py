"""Adaptive micro-batcher: callers submit one item and await its result; a single loop groups
queued items into batches of at most `max_batch_size`, waiting at most `max_delay` after the
first item of a batch, and runs each batch: awaited when `run_batch` is a coroutine function
(a remote backend's client), else in a worker thread (so a CPU-bound call leaves the loop free).

- The queue is bounded (`max_pending`): `submit` waits for room, which pushes back on the
  stream instead of buffering without limit.
- A caller that queues a whole chunk marks its last item (`enqueue(..., last=True)`): a batch
  that ends with it runs at once instead of waiting for items nobody is about to send.
- `run_batch` returns one entry per item, either the item's result or an exception for that
  item alone; an exception raised by `run_batch` itself reaches every waiter of the batch.
- `observe`, if given, hears of every batch run: its items' waits in the queue, the run's
  duration and whether `run_batch` raised (for metrics).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from streams.lifecycle import Service

T = TypeVar("T")
R = TypeVar("R")

Results = Sequence["R | BaseException"]
RunBatch = Callable[[list[T]], Results | Awaitable[Results]]
Observe = Callable[[list[float], float, bool], None]  # (queue waits s, run s, failed)


class BatcherStopped(RuntimeError):
    pass


@dataclass(slots=True)
class Queued(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    at: float  # when it was queued (monotonic)
    last: bool  # the last item its submitter queued


class AdaptiveBatcher(Service, Generic[T, R]):
    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_delay: float,
        max_pending: int,
        name: str = "batcher",
        observe: Observe | None = None,
    ) -> None:
        if max_batch_size < 1 or max_pending < 1 or max_delay < 0:
            raise ValueError("max_batch_size and max_pending must be >= 1, max_delay >= 0")
        self._run_batch = run_batch
        self._is_async = inspect.iscoroutinefunction(run_batch)
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.name = name
        self._observe = observe
        self._queue: asyncio.Queue[Queued[T, R]] = asyncio.Queue(max_pending)
        self._loop_task: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # recent batch sizes, for stats and tests

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name=f"{self.name}-loop")

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        while not self._queue.empty():
            future = self._queue.get_nowait().future
            if not future.done():
                future.set_exception(BatcherStopped(f"{self.name} stopped"))

    async def submit(self, item: T) -> R:
        return await (await self.enqueue(item))

    async def enqueue(self, item: T, last: bool = False) -> asyncio.Future[R]:
        """Queue an item (waiting for room) and return the future of its result: a caller with
        many items queues them all, the last with `last=True`, then awaits their futures, with
        no task per item."""
        if self._loop_task is None:
            raise BatcherStopped(f"{self.name} is not running")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put(Queued(item, future, time.monotonic(), last))
        return future

    async def _collect(self) -> list[Queued[T, R]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_delay
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            if batch[-1].last:
                break  # its submitter queued all it had: waiting would only delay it
            remaining = deadline - time.monotonic()  # the wait shrinks as the batch ages
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _call(self, items: list[T]) -> Results:
        if self._is_async:
            return await cast(Callable[[list[T]], Awaitable[Results]], self._run_batch)(items)
        return await asyncio.to_thread(cast(Callable[[list[T]], Results], self._run_batch), items)

    async def _run(self) -> None:
        while True:
            collected = await self._collect()
            # Waiters that gave up (cancelled) are not worth computing.
            queued = [entry for entry in collected if not entry.future.cancelled()]
            if not queued:
                continue
            self.batch_sizes = (self.batch_sizes + [len(queued)])[-1000:]
            batch = [(entry.item, entry.future) for entry in queued]
            items = [item for item, _ in batch]
            began = time.monotonic()
            try:
                results = await self._call(items)
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"{self.name}: run_batch returned {len(results)} results for {len(batch)} items"
                    )
            except asyncio.CancelledError:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(BatcherStopped(f"{self.name} stopped"))
                raise
            except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
                self._report(queued, began, failed=True)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self._report(queued, began, failed=False)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _report(self, queued: list[Queued[T, R]], began: float, failed: bool) -> None:
        if self._observe is not None:
            self._observe([began - entry.at for entry in queued], time.monotonic() - began, failed)

