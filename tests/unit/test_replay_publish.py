"""How the replayer publishes: copies built from the stored frame equal `replay_copy`'s, sends are
batched per partition and pipelined across chunks, and the checkpoint only moves past chunks
whose every batch the broker confirmed (a failed send, then a resume: no gap, no duplicate).
Fake consumer and producer, no broker, nothing timed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition

from streams.ops.replay import Replayer, ReplayJob, copy_event, replay_copy, stored_request
from streams.settings import Settings
from topics import events
from topics.errors import EventError
from topics.events import InferenceRequest

SOURCE, TARGET = "t.requests", "t.target"


def tensors(seed: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)}


def original(i: int, **fields: Any) -> InferenceRequest:
    return InferenceRequest(**{"request_id": f"orig-{i}", "model": "tiny", "reply_to": "my.replies",
                               "correlation_id": "c", "deadline_ms": 5, "batch_id": "b", "shadow_of": "s",
                               "tenant": "acme", "version": "1", **fields})


def decoded_equal(copy_raw: bytes, expected: InferenceRequest, expected_tensors: dict[str, np.ndarray]) -> None:
    got = events.decode_request(copy_raw)
    assert got.header.model_dump(exclude={"created_ms", "inputs"}) == expected.model_dump(
        exclude={"created_ms", "inputs"})
    assert got.tensors.keys() == expected_tensors.keys()
    for name, array in expected_tensors.items():
        np.testing.assert_array_equal(got.tensors[name], array)


@pytest.mark.parametrize("version", [None, "2"])
def test_copy_from_the_stored_frame_is_the_replay_copy(version):
    raw = events.encode_request(original(7), tensors(7))
    request, header, payload = stored_request(raw)
    copy_id, copy_raw = copy_event(request, header, payload, "n", SOURCE, 3, 41, version)
    expected = replay_copy(original(7), "n", SOURCE, 3, 41, version)
    assert copy_id == expected.request_id == "replay-n-3-41"
    decoded_equal(copy_raw, expected, tensors(7))
    assert copy_raw[:4] == events.MAGIC


def test_copy_of_a_json_event_keeps_its_inline_tensors():
    raw = events.encode_request(original(1), tensors(1), binary=False)
    copy_id, copy_raw = copy_event(*stored_request(raw), "n", SOURCE, 0, 2)
    decoded_equal(copy_raw, replay_copy(original(1), "n", SOURCE, 0, 2), tensors(1))


def test_stored_events_the_decoder_refuses_are_refused():
    good = events.encode_request(original(1), tensors(1))
    header, payload = events.unframe(good)
    header["inputs"][0]["nbytes"] += 4  # does not fit the shape
    bad_tensor = events.frame(header, bytes(payload))
    for raw in (b"garbage", orjson.dumps({"model": "tiny"}), bad_tensor):
        with pytest.raises(EventError):
            events.decode_request(raw)
        with pytest.raises(EventError):
            stored_request(raw)


# -- the publish loop, on fakes ------------------------------------------------------------------


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes
    timestamp: int = 1


class FakeConsumer:
    """A stored topic; each getmany hands out at most `per_fetch` records per partition, as a
    consumer hands out what it has fetched."""

    def __init__(self, log: dict[int, list[Record]], per_fetch: int) -> None:
        self.log, self.per_fetch = log, per_fetch
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self.log)

    async def beginning_offsets(self, tps):
        return {tp: 0 for tp in tps}

    async def end_offsets(self, tps):
        return {tp: len(self.log[tp.partition]) for tp in tps}

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.log[tp.partition])

    def assign(self, tps) -> None:
        self.positions = {tp: 0 for tp in tps}
        self.paused = set()

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def getmany(self, *tps, timeout_ms: int = 0, max_records: int | None = None):
        answer = {}
        room = max_records or 1 << 30
        for tp in tps or list(self.positions):
            if tp in self.paused or room <= 0:
                continue
            start = self.positions[tp]
            records = self.log[tp.partition][start:start + min(self.per_fetch, room)]
            if records:
                answer[tp] = records
                self.positions[tp] = start + len(records)
                room -= len(records)
        await asyncio.sleep(0)
        return answer


@dataclass
class FakeBatch:
    capacity: int
    records: list[tuple[bytes, bytes]] = field(default_factory=list)
    closed: bool = False

    def append(self, *, key: bytes, value: bytes, timestamp: Any) -> object | None:
        if self.closed or len(self.records) >= self.capacity:
            return None
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        self.closed = True


class FakeProducer:
    """Accepts batches; each delivery is settled by the test (or at once with `auto_ack`).
    `delivered` holds the copies of the batches confirmed."""

    def __init__(self, delivered: list[bytes], capacity: int = 1000, auto_ack: bool = False) -> None:
        self.delivered, self.capacity, self.auto_ack = delivered, capacity, auto_ack
        self.sent: list[tuple[FakeBatch, asyncio.Future[Any]]] = []
        self.sends = 0  # per-record sends (`send`)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2, 3}

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send(self, *args: Any, **kwargs: Any) -> None:
        self.sends += 1
        raise AssertionError("a replay sends batches")

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        assert topic == TARGET and batch.closed and batch.records
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((batch, future))
        if self.auto_ack:
            self.ack(len(self.sent) - 1)
        return future

    def ack(self, index: int) -> None:
        batch, future = self.sent[index]
        self.delivered += [value for _, value in batch.records]
        future.set_result(None)

    def unconfirmed(self) -> int:
        return sum(not f.done() for _, f in self.sent)


def stored_log(count: int, partitions: int = 2) -> dict[int, list[Record]]:
    log: dict[int, list[Record]] = {p: [] for p in range(partitions)}
    for i in range(count):
        p = i % partitions
        raw = events.encode_request(InferenceRequest(request_id=f"orig-{i}", model="tiny"), tensors(i))
        log[p].append(Record(SOURCE, p, len(log[p]), raw))
    return log


async def replayer(tmp_path, consumer: FakeConsumer, producer: FakeProducer, **job: Any) -> Replayer:
    r = Replayer(Settings(state_dir=tmp_path), ReplayJob(name="fake", topic=SOURCE, target=TARGET, **job))
    await r._consumer.stop()  # never started: only closed
    await r._producer.stop()
    r._consumer, r._producer = consumer, producer  # type: ignore[assignment]
    return r


async def settle() -> None:
    """Let the replay run until it waits on a delivery (fakes never wait on anything else)."""
    for _ in range(200):
        await asyncio.sleep(0)


def origins(delivered: list[bytes]) -> list[str]:
    return [events.decode_request_header(v)[0].replay_of.request_id for v in delivered]


async def test_sends_are_batched_and_pipelined_and_the_checkpoint_follows_confirmations(tmp_path, monkeypatch):
    monkeypatch.setattr("streams.ops.replay.CHUNK_RECORDS", 20)
    monkeypatch.setattr("streams.ops.replay.CHUNKS_IN_FLIGHT", 3)
    log = stored_log(200)
    delivered: list[bytes] = []
    producer = FakeProducer(delivered, capacity=4)
    first = await replayer(tmp_path, FakeConsumer(log, per_fetch=5), producer)
    task = asyncio.create_task(first.run())
    await settle()
    # Four chunks of 20 (4 fetches each) sent, none confirmed: all their batches in flight at
    # once, one per target partition and chunk, more where one filled up at 4 copies.
    assert not task.done() and producer.sends == 0
    assert sum(len(b.records) for b, _ in producer.sent) == 80
    assert producer.unconfirmed() == len(producer.sent)
    assert 4 * 4 <= len(producer.sent) <= 80 / 2 and max(len(b.records) for b, _ in producer.sent) == 4
    assert not first.checkpoint.path.exists()  # nothing confirmed, nothing recorded

    # The first chunk's batches confirmed: the checkpoint moves past its 20 records, no further.
    for i, (batch, _) in enumerate(producer.sent):
        if all(int(o[5:]) < 20 for o in origins([v for _, v in batch.records])):
            producer.ack(i)
    await settle()
    assert first.checkpoint.load() == {0: 10, 1: 10}
    assert sorted(origins(delivered), key=lambda s: int(s[5:])) == [f"orig-{n}" for n in range(20)]

    # A batch of the second chunk fails: the replay stops, the checkpoint stays.
    second = next(i for i, (_, f) in enumerate(producer.sent) if not f.done())
    producer.sent[second][1].set_exception(RuntimeError("broker said no"))
    with pytest.raises(RuntimeError, match="broker said no"):
        await task
    assert first.checkpoint.load() == {0: 10, 1: 10}

    # Resumed: from the checkpoint to the end, every copy once.
    resumed = await replayer(tmp_path, FakeConsumer(log, per_fetch=5), FakeProducer(delivered, auto_ack=True),
                             resume=True)
    progress = await resumed.run()
    assert progress.published == 180
    assert sorted(origins(delivered)) == sorted(f"orig-{n}" for n in range(200))
    assert resumed.checkpoint.load() == {0: 100, 1: 100}


async def test_dry_run_sends_nothing_and_keeps_no_checkpoint(tmp_path):
    producer = FakeProducer([], auto_ack=True)
    dry = await replayer(tmp_path, FakeConsumer(stored_log(30), per_fetch=7), producer, dry_run=True)
    progress = await dry.run()
    assert (progress.read, progress.published) == (30, 30) and producer.sent == []
    assert not (tmp_path / "replay" / "fake.json").exists()


async def test_a_stop_after_max_events_resumes_at_the_next_record(tmp_path):
    log, delivered = stored_log(50), []
    first = await (await replayer(tmp_path, FakeConsumer(log, per_fetch=3),
                                  FakeProducer(delivered, capacity=2, auto_ack=True), max_events=17)).run()
    assert first.published == 17
    second = await (await replayer(tmp_path, FakeConsumer(log, per_fetch=3),
                                   FakeProducer(delivered, capacity=2, auto_ack=True), resume=True)).run()
    assert second.published == 33
    assert sorted(origins(delivered)) == sorted(f"orig-{n}" for n in range(50))


async def test_a_paced_replay_sends_each_copy_once_in_small_chunks(tmp_path):
    log, delivered = stored_log(24), []
    producer = FakeProducer(delivered, auto_ack=True)
    progress = await (await replayer(tmp_path, FakeConsumer(log, per_fetch=50), producer, rate=5000)).run()
    assert progress.published == 24
    assert sorted(origins(delivered)) == sorted(f"orig-{n}" for n in range(24))
