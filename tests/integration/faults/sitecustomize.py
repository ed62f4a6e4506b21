"""Fault injection for worker processes started by the tests (on PYTHONPATH only there).

INFERSTREAM_FAULT_CRASH_MARKER=<bytes>: the first chunk an agent takes that holds an event
containing the marker crashes the agent outside its step's error handling, once per process
(the marker file INFERSTREAM_FAULT_ONCE_FILE records that it happened)."""

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
