"""How long each fetch of a consumer waits: short while records flow, long while the consumer is
behind, and slow polling, woken by clients, once it has been idle.

A fetch with `fetch_min_bytes=1` asks the broker to answer once a record is there or the wait
(`fetch_max_wait_ms`) has passed. Apache Kafka answers as soon as a record arrives, whatever the
wait. The local broker (Tansu 0.6, `bench/longpoll.py`) looks for records only at the start of a
fetch and then at 1/2, 3/4, 7/8, ... of the wait: a record that arrives during a 1000 ms fetch is
answered up to 500 ms later (p50 ~175 ms), and the connection answers nothing else meanwhile (a
request behind a held fetch waits for it). An empty fetch costs it ~0.5-0.7 ms of CPU, and the
client about as much: a consumer that asks every 10 ms keeps ~0.1-0.2 cores busy doing nothing.

So a consumer on the latency path (the worker's Faust consumer, the client's reply consumer)
fetches with a `FetchWait`:

- **active** (records within the last `kafka_idle_after_s`, or woken): `kafka_fetch_max_wait_ms`
  (10 ms), so each hop on Tansu takes a few ms;
- **behind** (a partition it fetches has records past its position, by the high watermark of
  the last response): `BACKLOG_FETCH_WAIT_MS`. Tansu with S3 storage spends no more than the
  wait on reading (each fetch lists the partition's objects, tens of ms), so at 10 ms a response
  carries about one record batch per partition and a consumer that fell behind, as workers do
  after a broker restart, never catches up; with a long wait it reads the backlog in a few large
  responses;
- **idle** (`kafka_idle_mode`): `wake` (the default, for Tansu) fetches once per
  `kafka_idle_fetch_max_wait_ms` with the short wait and has no fetch outstanding in between, so
  a wake starts a fetch at once: `InferenceClient` wakes its own reply consumer on each send and
  the workers through a Redis channel (`wake_channel`) when it starts sending after a quiet
  spell (`follow_wakes` listens). A record no client announced waits up to one idle interval.
  `long-poll` (for Apache Kafka) fetches with `kafka_idle_fetch_max_wait_ms` as the wait: the
  broker answers when a record arrives, and wakes change nothing.

Consumers off the latency path (the registry follower, the lag reader) simply fetch with a long
wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from streams.settings import Settings

log = logging.getLogger(__name__)

BACKLOG_FETCH_WAIT_MS = 500  # Apache Kafka's default fetch wait
WAKE_RETRY_S = (1.0, 30.0)  # first and longest pause before subscribing again after a Redis error

IdleMode = Literal["wake", "long-poll"]


@dataclass(frozen=True)
class IdlePolicy:
    """What a consumer on the latency path does once it has seen no record for `after_s`."""

    after_s: float
    wait_ms: int  # `wake`: the interval between idle polls; `long-poll`: the fetch wait
    mode: IdleMode = "wake"

    @classmethod
    def from_settings(cls, settings: Settings) -> IdlePolicy:
        return cls(settings.kafka_idle_after_s, settings.kafka_idle_fetch_max_wait_ms, settings.kafka_idle_mode)


def wake_channel(settings: Settings) -> str:
    """The Redis channel on which clients wake a deployment's idle workers."""
    return f"{settings.topic_prefix}:wake"


def behind(assignment: Any, buffered: Container[TopicPartition] = ()) -> bool:
    """Whether a partition of the assignment that the next fetch asks for has records past the
    consumer's position. Paused partitions and those whose fetched records are still being
    consumed (`buffered`) are not asked for."""
    for tp in assignment.tps:
        if tp in buffered:
            continue
        state = assignment.state_value(tp)
        if (state is not None and state.has_valid_position and not state.paused
                and state.highwater is not None and state.position < state.highwater):
            return True
    return False


def _progress(assignment: Any) -> int:
    """The sum of the positions: it moves whenever the consumer takes records."""
    total = 0
    for tp in assignment.tps:
        state = assignment.state_value(tp)
        if state is not None and state.has_valid_position:
            total += state.position
    return total


class FetchWait:
    """Sets the wait of each fetch a started consumer sends (see the module docstring).

    The fetcher plans its requests in `_get_actions_per_node`, once per round of its background
    routine, reading the wait from `_fetch_max_wait_ms`; `_records` holds what it fetched and the
    consumer has not taken yet. The routine sleeps until a fetch returns, the consumer takes
    records (`_wait_consume_future`), or the planned timeout passes: an idle poll that is not due
    yet is dropped from the plan, and `wake` resolves that future so the routine plans again.
    """

    def __init__(self, consumer: AIOKafkaConsumer, *, idle: IdlePolicy | None = None,
                 backlog_wait_ms: int = BACKLOG_FETCH_WAIT_MS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        fetcher = consumer._fetcher
        if fetcher is None:
            raise RuntimeError("start the consumer first")
        self._fetcher = fetcher
        self.active_wait_ms: int = fetcher._fetch_max_wait_ms
        self.backlog_wait_ms = max(backlog_wait_ms, self.active_wait_ms)
        self.idle = idle
        self._clock = clock
        self._plan: Callable[[Any], Any] = fetcher._get_actions_per_node
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._last_active = clock()
        self._progress: int | None = None
        self._next_idle_poll = 0.0
        self.state = "active"  # as of the last plan: active, behind, idle
        fetcher._get_actions_per_node = self._plan_with_wait

    def wake(self) -> None:
        """Fetch at the short wait from now on (until the consumer is idle again), at once if
        it is between idle polls. From any thread; cheap when the consumer is not idle."""
        self._last_active = self._clock()
        if self.state != "idle":
            return  # the next plan sees it
        self._next_idle_poll = 0.0
        if threading.get_ident() == self._thread:
            self._poke()
        else:
            try:
                self._loop.call_soon_threadsafe(self._poke)
            except RuntimeError:  # the consumer's loop is closed: it has stopped
                pass

    def _poke(self) -> None:
        future = self._fetcher._wait_consume_future
        if future is not None and not future.done():
            future.set_result(None)

    def _plan_with_wait(self, assignment: Any) -> Any:
        now = self._clock()
        fetcher = self._fetcher
        progress = _progress(assignment)
        if fetcher._records or progress != self._progress:
            self._progress, self._last_active = progress, now
        polling_idle = False
        if behind(assignment, fetcher._records):
            self.state, self._last_active = "behind", now
            fetcher._fetch_max_wait_ms = self.backlog_wait_ms
        elif self.idle is None or now - self._last_active < self.idle.after_s:
            self.state = "active"
            fetcher._fetch_max_wait_ms = self.active_wait_ms
        else:
            self.state = "idle"
            polling_idle = self.idle.mode == "wake"
            fetcher._fetch_max_wait_ms = self.active_wait_ms if polling_idle else self.idle.wait_ms
        fetch_requests, reset_requests, timeout, invalid_metadata, resume_futures = self._plan(assignment)
        if polling_idle and fetch_requests and self.idle is not None:
            if now < self._next_idle_poll:
                fetch_requests, timeout = [], min(timeout, self._next_idle_poll - now)
            else:
                self._next_idle_poll = now + self.idle.wait_ms / 1000
        return fetch_requests, reset_requests, timeout, invalid_metadata, resume_futures


def wait_longer_when_behind(consumer: AIOKafkaConsumer, backlog_wait_ms: int = BACKLOG_FETCH_WAIT_MS) -> FetchWait:
    """A started consumer fetches with `backlog_wait_ms` while it is behind, with its own
    `fetch_max_wait_ms` otherwise (never idle)."""
    return FetchWait(consumer, backlog_wait_ms=backlog_wait_ms)


async def follow_wakes(redis_url: str, channel: str, wake: Callable[[], None],
                       retry_s: tuple[float, float] = WAKE_RETRY_S) -> None:
    """Call `wake` for each message on a Redis channel, until cancelled. The subscription blocks
    on its socket (no polling); while Redis is unreachable it is tried again, with a growing
    pause, and the consumer meanwhile polls at its idle interval."""
    delay = retry_s[0]
    while True:
        client = aioredis.from_url(redis_url)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(channel)
            delay = retry_s[0]
            wake()  # a wake may have been sent while not subscribed
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    wake()
        except Exception as exc:  # noqa: BLE001 - wakes only save latency: never stop the consumer
            log.warning("not following wakes on %s (%r); again in %.0f s", channel, exc, delay)
        finally:
            await pubsub.aclose()
            await client.aclose()
        await asyncio.sleep(delay)
        delay = min(delay * 2, retry_s[1])


class WakePublisher:
    """A client's side of the wakes: publishes on the channel when it starts sending after a
    quiet spell (at most once per half the idle period), without holding up the send."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis_url = settings.redis_url
        self.channel = wake_channel(settings)
        self.every_s = settings.kafka_idle_after_s / 2
        self.enabled = settings.kafka_idle_mode == "wake"
        self._clock = clock
        self._last = float("-inf")
        self._redis: aioredis.Redis | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._failed = False
        self.published = 0

    def sending(self) -> None:
        """Called on each send: publishes a wake in the background when one is due."""
        now = self._clock()
        if not self.enabled or now - self._last < self.every_s:
            return
        self._last = now
        task = asyncio.get_running_loop().create_task(self._publish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self) -> None:
        try:
            if self._redis is None:
                self._redis = aioredis.from_url(self.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
            await self._redis.publish(self.channel, b"")
            self.published += 1
            if self._failed:
                self._failed = False
                log.info("waking idle workers through Redis again")
        except (RedisError, OSError) as exc:
            if not self._failed:
                self._failed = True
                log.warning("could not wake idle workers through Redis (%r): a request after a quiet "
                            "spell waits for their next idle poll", exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
