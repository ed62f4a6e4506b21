"""A consumer's fetch wait that grows while the consumer is behind.

A short fetch wait (`kafka_fetch_max_wait_ms`, 10 ms by default) keeps each hop fast on a broker
that holds a fetch until the wait expires when there is little to read (Tansu does). But Tansu
with S3 storage also spends no more than that wait on reading: each fetch lists the partition's
objects (tens of ms, growing with the partition) and reads batches until the wait is used up, so
at 10 ms a response carries about one record batch per partition, five or so a second. A
consumer that fell behind, as workers do after a broker restart when the requests sent meanwhile
are waiting, then drains its backlog slower than new events arrive and never catches up.

So while any partition it fetches has records past its position (by the high watermark of the
last response), the consumer asks with a longer wait. Apache Kafka answers as soon as there is
data, whatever the wait; Tansu reads the backlog in a few large responses. Caught up, the
consumer is back at the short wait.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

BACKLOG_FETCH_WAIT_MS = 500  # Apache Kafka's default fetch wait


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


def wait_longer_when_behind(consumer: AIOKafkaConsumer, backlog_wait_ms: int = BACKLOG_FETCH_WAIT_MS) -> None:
    """Make a started consumer fetch with `backlog_wait_ms` while it is behind, and with its own
    `fetch_max_wait_ms` otherwise. The fetcher builds its requests in `_get_actions_per_node`,
    once per round, reading the wait from `_fetch_max_wait_ms`; `_records` holds what it fetched
    and the consumer has not taken yet."""
    fetcher = consumer._fetcher
    if fetcher is None:
        raise RuntimeError("start the consumer first")
    caught_up_wait_ms = fetcher._fetch_max_wait_ms
    if backlog_wait_ms <= caught_up_wait_ms:
        return
    plan: Callable[[Any], Any] = fetcher._get_actions_per_node

    def plan_with_wait(assignment: Any) -> Any:
        fetcher._fetch_max_wait_ms = backlog_wait_ms if behind(assignment, fetcher._records) else caught_up_wait_ms
        return plan(assignment)

    fetcher._get_actions_per_node = plan_with_wait
