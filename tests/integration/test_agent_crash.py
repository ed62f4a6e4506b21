"""At-least-once whatever raises: an agent that crashes mid-chunk acknowledges nothing it took,
and its worker stops so that a restarted one reads those events again."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from streams.client import InferenceClient
from streams.harness import tiny_input, wait_ready
from topics.events import Status

pytestmark = pytest.mark.integration
FAULTS = Path(__file__).parent / "faults"


async def test_a_crashed_agent_acknowledges_nothing_it_took(start_worker, settings, tmp_path, monkeypatch):
    marker = f"crash-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PYTHONPATH", str(FAULTS))
    monkeypatch.setenv("INFERSTREAM_FAULT_CRASH_MARKER", marker)
    monkeypatch.setenv("INFERSTREAM_FAULT_ONCE_FILE", str(tmp_path / "crashed"))
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        pending = []
        for i in range(30):
            request = client.request("tiny", {}, timeout=120)
            if i == 10:
                request.request_id = f"{marker}-{request.request_id}"
            pending.append((request, await client.send(request, tiny_input(seed=i), delivered=True)))
        # The worker stops by itself once its agent crashed.
        deadline = time.monotonic() + 60
        while worker.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert (tmp_path / "crashed").exists(), worker.log()[-3000:]
        assert worker.proc.poll() is not None, "the worker kept running with an agent that crashed"
        monkeypatch.delenv("INFERSTREAM_FAULT_CRASH_MARKER")
        start_worker()  # reads again what the crashed one took but never finished
        results = await asyncio.gather(*(client.wait(r, w) for r, w in pending))
    assert [r.header.status for r in results] == [Status.OK] * 30
