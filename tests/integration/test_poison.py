"""Poison events and crashes: a poison event costs its partition nothing but its own rejection,
and an agent that crashes mid-chunk acknowledges nothing it took (its worker stops so that a
restarted one reads those events again)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson
import pytest
from support.deadletters import dead_letters_of
from support.waiting import wait_for

from infra.local.harness import tiny_input, wait_ready
from streams.client import InferenceClient
from topics import events
from topics.errors import ErrorCode
from topics.events import Status

pytestmark = pytest.mark.integration
FAULTS = Path(__file__).parent / "faults"


@pytest.mark.parametrize("stop_hangs", [False, True], ids=["stops", "stop-hangs"])
async def test_a_crashed_agent_acknowledges_nothing_it_took(start_worker, settings, tmp_path, monkeypatch, stop_hangs):
    """...and its worker ends, even when stopping hangs: past CRASH_STOP_DEADLINE_S it exits."""
    marker = f"crash-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PYTHONPATH", str(FAULTS))
    monkeypatch.setenv("INFERSTREAM_FAULT_CRASH_MARKER", marker)
    monkeypatch.setenv("INFERSTREAM_FAULT_ONCE_FILE", str(tmp_path / "crashed"))
    if stop_hangs:
        monkeypatch.setenv("INFERSTREAM_FAULT_STOP_HANGS", "1")
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        pending = []
        for i in range(30):
            request = client.request("tiny", timeout=120)
            if i == 10:
                request.request_id = f"{marker}-{request.request_id}"
            pending.append((request, await client.send(request, tiny_input(seed=i), delivered=True)))
        # The worker stops by itself once its agent crashed.
        await wait_for(lambda: worker.proc.poll() is not None, timeout=60, interval=0.2,
                       what="the worker stopping after its agent crashed")
        assert (tmp_path / "crashed").exists(), worker.log()[-3000:]
        assert worker.proc.returncode != 0
        if stop_hangs:  # without the fault, stopping after a crash may hang too (a race in faust)
            assert "did not stop within" in worker.log(), worker.log()[-3000:]
        monkeypatch.delenv("INFERSTREAM_FAULT_CRASH_MARKER")
        monkeypatch.delenv("INFERSTREAM_FAULT_STOP_HANGS", raising=False)
        start_worker()  # reads again what the crashed one took but never finished
        results = await asyncio.gather(*(client.wait(r, w) for r, w in pending))
    errors = {i: r.header.error for i, r in enumerate(results) if r.header.status != Status.OK}
    assert not errors, errors


async def test_poison_events_are_rejected_alone_at_once(start_worker, settings):
    """A null or garbage traceparent, non-UTF-8 and forged internal headers, a 65-dimension
    shape: each poison event is dead-lettered on its own without retrying its chunk, and the
    good requests produced after it on the same partition are answered."""
    worker = start_worker()
    poison_headers = [
        [("traceparent", None)], [("traceparent", b"\xff\xfe garbage")], [("inferstream-version", b"\xff\xfe")],
        [("tracestate", None), ("x", None)],
    ]
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        poisoned, pending = [], []
        for i, headers in enumerate(poison_headers):
            request = client.request("tiny", timeout=60)
            request.request_id = f"headers-{i}-{request.request_id}"
            pending.append((request, await client.send(request, tiny_input(seed=i), headers=headers)))
        deep = client.request("tiny", timeout=60)
        body = orjson.loads(events.encode_request(deep, tiny_input(), binary=False))
        body["inputs"][0]["shape"] = [1] * 65
        body["inputs"][0]["data"] = [[0.0]]
        await client.produce(client.topics.requests, b"same-key", orjson.dumps(body))
        poisoned.append(deep.request_id)
        for i in range(50):
            request = client.request("tiny", timeout=60)
            pending.append((request, await client.send(request, tiny_input(seed=100 + i))))
        results = await asyncio.gather(*(client.wait(r, w) for r, w in pending))
        letters = await dead_letters_of(settings, {deep.request_id}, timeout=30)
    # Headers a producer may set, however odd, do not make a request poison.
    assert [r.header.status for r in results] == [Status.OK] * len(results)
    assert letters[deep.request_id].letter.reason in (ErrorCode.INVALID_TENSOR, ErrorCode.INVALID_SCHEMA,
                                               ErrorCode.INTERNAL)
    log = worker.log()
    assert "failed on" not in log and "Restarting dead Agent" not in log  # no chunk retried, no crash


async def test_a_model_server_stopped_under_a_request_is_an_outage_not_an_answer(model_repository):
    """On shutdown or reload a version's server stops under the requests it holds: those must be
    retried (by this worker or the next owner), never answered UNAVAILABLE to their callers."""
    from streams.registry.records import load_repository
    from streams.serving.version_server import ServerStopped, VersionServer
    from streams.settings import Settings
    from streams.worker.failures import Failure, classify

    info = load_repository(model_repository, ["tiny"])[0]
    server = await VersionServer.create(info, Settings(_env_file=None))
    [outcome] = await server.submit([tiny_input()])
    assert not isinstance(outcome, BaseException) and outcome.outputs
    await server.stop()
    with pytest.raises(ServerStopped) as caught:
        await server.submit([tiny_input()])
    assert classify(caught.value) is Failure.OUTAGE


async def test_a_bug_answers_the_caller_internal_error_and_tells_details_only_to_the_dead_letter(
        start_worker, settings, monkeypatch):
    marker = f"bug-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("PYTHONPATH", str(FAULTS))
    monkeypatch.setenv("INFERSTREAM_FAULT_BUG_MARKER", marker)
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        request = client.request("tiny", timeout=60)
        request.request_id = f"{marker}-{request.request_id}"
        result = await client.wait(request, await client.send(request, tiny_input()))
        letters = await dead_letters_of(settings, {request.request_id}, timeout=30)
    error = result.header.error
    assert error is not None and error.code == ErrorCode.INTERNAL, error
    assert "secret" not in error.message and "RuntimeError" not in error.message, error.message
    letter = letters[request.request_id].letter
    assert letter.reason == ErrorCode.INTERNAL and "RuntimeError: injected bug" in letter.message
