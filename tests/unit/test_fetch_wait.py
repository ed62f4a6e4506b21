"""A consumer counts as behind only while a partition it fetches has records past its position."""

from aiokafka import TopicPartition
from aiokafka.consumer.subscription_state import SubscriptionState

from streams.fetch_wait import behind


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
