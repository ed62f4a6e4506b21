"""A reply's inline outputs reach the caller without leaving the event loop."""

import asyncio

import numpy as np

from streams.client import InferenceClient
from streams.settings import Settings
from topics.events import InferenceResult, Result, Status


async def test_inline_outputs_take_no_thread_hop(monkeypatch):
    def no_threads(*args, **kwargs):
        raise AssertionError("inline outputs went through a thread")

    monkeypatch.setattr(asyncio, "to_thread", no_threads)
    client = InferenceClient(Settings(_env_file=None, s3_endpoint="127.0.0.1:9"))
    y = np.arange(4, dtype=np.float32)
    result = Result(InferenceResult(request_id="r1", status=Status.OK, model="tiny"), {"y": y})
    outputs = await client.outputs(result)
    assert outputs["y"] is y
