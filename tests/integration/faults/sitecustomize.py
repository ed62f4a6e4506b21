"""Fault injection for worker processes started by the tests (on PYTHONPATH only there).

INFERSTREAM_FAULT_CRASH_MARKER=<bytes>: the first chunk an agent takes that holds an event
containing the marker crashes the agent outside its step's error handling, once per process
(the marker file INFERSTREAM_FAULT_ONCE_FILE records that it happened). More below."""

import os

marker = os.environ.get("INFERSTREAM_FAULT_CRASH_MARKER")
once = os.environ.get("INFERSTREAM_FAULT_ONCE_FILE")
if marker and once:
    import agents.common as common

    original = common.to_messages

    def to_messages(batch):
        if not os.path.exists(once) and any(marker.encode() in (e.message.value or b"") for e in batch):
            open(once, "w").close()
            raise RuntimeError("injected agent crash")
        return original(batch)

    common.to_messages = to_messages

# INFERSTREAM_FAULT_STOP_HANGS=1: the consumer's final commit, when the worker stops, never returns
# (as when a crash has already stopped the consumer's thread).
if os.environ.get("INFERSTREAM_FAULT_STOP_HANGS"):
    import asyncio

    from faust.transport import consumer as faust_consumer

    async def commit_forever(self, *args, **kwargs):
        await asyncio.Event().wait()

    faust_consumer.Consumer.commit_and_end_transactions = commit_forever

# INFERSTREAM_FAULT_BUG_MARKER=<text>: a request whose id contains it meets a bug inside the
# intake's step (its deadline check raises), always.
bug = os.environ.get("INFERSTREAM_FAULT_BUG_MARKER")
if bug:
    import streams.worker.intake as intake

    checked = intake.check_deadline

    def check_deadline(request, now):
        if bug in request.request_id:
            raise RuntimeError(f"injected bug at /srv/secret/path.py for {request.request_id}")
        return checked(request, now)

    intake.check_deadline = check_deadline
