"""Replies find their waiting future by correlation id: one dict lookup per reply, however many
requests are pending; late and foreign replies are counted, not matched."""

import asyncio

from streams.client import InferenceClient
from streams.settings import Settings
from topics import events
from topics.events import InferenceResult, Status

PENDING = 10_000


async def test_a_reply_resolves_its_own_waiter_among_many_and_late_or_foreign_ones_are_counted():
    client = InferenceClient(Settings(_env_file=None, s3_endpoint="127.0.0.1:9"))
    loop = asyncio.get_running_loop()
    waiters = {f"c{i}": loop.create_future() for i in range(PENDING)}
    client._waiters.update(waiters)
    reply = events.encode_result(InferenceResult(request_id="r", status=Status.OK, model="tiny"), {})
    client._deliver("c4242", reply)
    assert waiters["c4242"].result().header.request_id == "r"
    assert sum(w.done() for w in waiters.values()) == 1
    assert client.pending == PENDING - 1
    client._forget("c7")  # its caller gave up
    client._deliver("c7", reply)
    client._deliver("someone-else", reply)
    client._deliver("c4242", reply)  # an at-least-once duplicate
    assert (client.late_replies, client.foreign_replies) == (1, 2)
    assert not waiters["c7"].done() and client.pending == PENDING - 2
