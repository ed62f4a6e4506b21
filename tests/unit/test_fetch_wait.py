"""Fetch waits: behind only while a partition it fetches has records past its position; short
while records flow, slow polls (or a long wait) once idle, and wakes that end an idle pause."""

import asyncio
import threading

from aiokafka import TopicPartition
from aiokafka.consumer.subscription_state import SubscriptionState

from streams.kafka.fetch_wait import (
    BACKLOG_FETCH_WAIT_MS,
    FetchWait,
    IdlePolicy,
    WakePublisher,
    behind,
    wait_longer_when_behind,
)
from streams.settings import Settings


async def test_behind_only_while_a_fetchable_partition_has_records_past_its_position():
    subscription = SubscriptionState()
    first, second = TopicPartition("t", 0), TopicPartition("t", 1)
    subscription.assign_from_user([first, second])
    assignment = subscription.subscription.assignment
    assert not behind(assignment)  # no positions yet
    for tp in (first, second):
        subscription.seek(tp, 5)
    assert not behind(assignment)  # nothing fetched yet: no high watermark
    for tp in (first, second):
        assignment.state_value(tp).highwater = 5
    assert not behind(assignment)  # caught up
    assignment.state_value(second).highwater = 9
    assert behind(assignment)
    subscription.pause(second)  # not fetched while paused
    assert not behind(assignment)
    subscription.resume(second)
    assert behind(assignment)
    assert not behind(assignment, buffered={second})  # its fetched records are being consumed
    subscription.seek(second, 9)
    assert not behind(assignment)


# -- FetchWait: the wait of each planned fetch --------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeFetcher:
    """What FetchWait reads and replaces on aiokafka's Fetcher: the plan records the wait it was
    asked to build its requests with."""

    def __init__(self, wait_ms: int) -> None:
        self._fetch_max_wait_ms = wait_ms
        self._records: dict = {}
        self._wait_consume_future: asyncio.Future | None = None
        self.planned: list[int] = []

    def _get_actions_per_node(self, assignment):
        self.planned.append(self._fetch_max_wait_ms)
        return [(0, f"fetch with {self._fetch_max_wait_ms} ms")], {}, 0.2, False, []


class FakeConsumer:
    def __init__(self, wait_ms: int) -> None:
        self._fetcher = FakeFetcher(wait_ms)


def caught_up_assignment() -> tuple[SubscriptionState, TopicPartition]:
    subscription = SubscriptionState()
    tp = TopicPartition("t", 0)
    subscription.assign_from_user([tp])
    subscription.seek(tp, 5)
    subscription.subscription.assignment.state_value(tp).highwater = 5
    return subscription, tp


def plan(fetcher: FakeFetcher, subscription: SubscriptionState):
    fetches, _resets, timeout, _invalid, _resume = fetcher._get_actions_per_node(subscription.subscription.assignment)
    return fetches, timeout


async def test_short_wait_while_records_flow_then_the_idle_wait_when_long_polling():
    clock, consumer = FakeClock(), FakeConsumer(10)
    subscription, tp = caught_up_assignment()
    wait = FetchWait(consumer, idle=IdlePolicy(after_s=2.0, wait_ms=1000, mode="long-poll"), clock=clock)
    fetcher = consumer._fetcher
    plan(fetcher, subscription)
    clock.now += 1.9
    fetches, _ = plan(fetcher, subscription)
    assert fetches and fetcher.planned[-1] == 10 and wait.state == "active"
    clock.now += 0.2  # 2.1 s without a record
    fetches, _ = plan(fetcher, subscription)
    assert fetches and fetcher.planned[-1] == 1000 and wait.state == "idle"
    subscription.seek(tp, 6)  # the consumer took a record
    subscription.subscription.assignment.state_value(tp).highwater = 6
    plan(fetcher, subscription)
    assert fetcher.planned[-1] == 10 and wait.state == "active"


async def test_behind_fetches_with_the_backlog_wait_whatever_the_idle_state():
    clock, consumer = FakeClock(), FakeConsumer(10)
    subscription, tp = caught_up_assignment()
    FetchWait(consumer, idle=IdlePolicy(after_s=2.0, wait_ms=1000, mode="wake"), clock=clock)
    subscription.subscription.assignment.state_value(tp).highwater = 50
    clock.now += 60
    fetches, _ = plan(consumer._fetcher, subscription)
    assert fetches and consumer._fetcher.planned[-1] == BACKLOG_FETCH_WAIT_MS


async def test_idle_in_wake_mode_polls_once_per_interval_with_no_fetch_between():
    clock, consumer = FakeClock(), FakeConsumer(10)
    subscription, _ = caught_up_assignment()
    wait = FetchWait(consumer, idle=IdlePolicy(after_s=2.0, wait_ms=1000, mode="wake"), clock=clock)
    fetcher = consumer._fetcher
    plan(fetcher, subscription)
    clock.now += 2.5
    fetches, _ = plan(fetcher, subscription)  # the first idle poll: due at once, short wait
    assert fetches and fetcher.planned[-1] == 10 and wait.state == "idle"
    clock.now += 0.25
    fetches, timeout = plan(fetcher, subscription)
    assert fetches == [] and timeout == 0.2  # not due: nothing outstanding
    clock.now += 0.625
    fetches, timeout = plan(fetcher, subscription)
    assert fetches == [] and timeout == 0.125  # the routine plans again when it is due
    clock.now += 0.125
    fetches, _ = plan(fetcher, subscription)
    assert fetches and fetcher.planned[-1] == 10


async def test_a_wake_fetches_at_once_and_keeps_the_consumer_active():
    clock, consumer = FakeClock(), FakeConsumer(10)
    subscription, _ = caught_up_assignment()
    wait = FetchWait(consumer, idle=IdlePolicy(after_s=2.0, wait_ms=1000, mode="wake"), clock=clock)
    fetcher = consumer._fetcher
    plan(fetcher, subscription)
    clock.now += 5
    plan(fetcher, subscription)  # an idle poll
    fetcher._wait_consume_future = asyncio.get_running_loop().create_future()
    assert plan(fetcher, subscription)[0] == []  # between idle polls
    wait.wake()
    assert fetcher._wait_consume_future.done()  # the fetch routine plans again now
    fetches, _ = plan(fetcher, subscription)
    assert fetches and fetcher.planned[-1] == 10 and wait.state == "active"
    clock.now += 1.5
    assert plan(fetcher, subscription)[0]  # still active: short waits, no idle pause
    # Woken while active: nothing to do until the next plan.
    fetcher._wait_consume_future = asyncio.get_running_loop().create_future()
    wait.wake()
    assert not fetcher._wait_consume_future.done()


async def test_a_wake_from_another_thread_reaches_the_consumers_loop():
    clock, consumer = FakeClock(), FakeConsumer(10)
    subscription, _ = caught_up_assignment()
    wait = FetchWait(consumer, idle=IdlePolicy(after_s=2.0, wait_ms=1000, mode="wake"), clock=clock)
    plan(consumer._fetcher, subscription)
    clock.now += 5
    plan(consumer._fetcher, subscription)  # idle
    future = consumer._fetcher._wait_consume_future = asyncio.get_running_loop().create_future()
    thread = threading.Thread(target=wait.wake)
    thread.start()
    thread.join(5)
    await asyncio.wait_for(future, 5)


async def test_without_an_idle_policy_the_wait_stays_short_when_quiet():
    clock, consumer = FakeClock(), FakeConsumer(10)
    subscription, _ = caught_up_assignment()
    wait_longer_when_behind(consumer)  # type: ignore[arg-type]
    clock.now += 3600
    assert plan(consumer._fetcher, subscription)[0] and consumer._fetcher.planned[-1] == 10


async def test_a_client_publishes_a_wake_at_most_once_per_half_idle_period(monkeypatch):
    clock = FakeClock()
    publisher = WakePublisher(Settings(kafka_idle_after_s=2.0), clock=clock)
    published: list[float] = []

    async def publish() -> None:
        published.append(clock.now)

    monkeypatch.setattr(publisher, "_publish", publish)
    for step in (0.0, 0.5, 0.25, 0.25):  # sends at 0, 0.5, 0.75 and 1 s
        clock.now += step
        publisher.sending()
        await asyncio.sleep(0)  # the background publish runs
    assert published == [100.0, 101.0]
    publisher = WakePublisher(Settings(kafka_idle_mode="long-poll"), clock=clock)
    monkeypatch.setattr(publisher, "_publish", publish)
    publisher.sending()
    await asyncio.sleep(0)
    assert len(published) == 2  # Apache Kafka answers long polls: no wakes
