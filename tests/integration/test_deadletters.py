"""Dead letters on the real stack: always small enough to send, free of credentials, and the
dead-letter tooling unshaken by whatever else lies on its topic."""

from __future__ import annotations

import time

import jwt
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from support.cli_process import run_cli
from support.deadletters import dead_letters_of
from support.topics import topic_records

from infra.local.harness import tiny_input, wait_ready
from infra.local.stack import free_port
from streams.client import InferenceClient
from streams.ops.dlq import StoreUnreachable, Unreadable, describe, read_letters, redrive
from streams.storage.objects import ObjectStore
from streams.worker.deadletters import object_key
from topics import events
from topics.errors import ErrorCode
from topics.events import Credentials, DeadLetter, InferenceRequest, InferenceResult, Status
from topics.names import Topics

pytestmark = pytest.mark.integration
SECRET = "dead-letter-tests-secret-of-32-bytes-or-more"
API_KEY = "isk_0123456789_thisisasecretapikey"


def bearer() -> str:
    claims = {"tenant": "acme", "scope": "infer", "sub": "alice", "exp": int(time.time()) + 600}
    return "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")


async def test_an_oversized_original_goes_to_s3_and_the_partition_goes_on(start_worker, settings):
    topics = Topics(settings.topic_prefix)
    worker = start_worker(jwt_hs_secret=SECRET)
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
    replies = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                               enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=10,
                                max_request_size=settings.max_message_bytes + 64 * 1024)
    await replies.start()
    await producer.start()
    token = bearer()
    big = InferenceRequest(request_id=f"big-{settings.app_id}", model="no-such-model", correlation_id="big",
                           credentials=Credentials(authorization=token))
    rows = 3_500_000 // (16 * 4)
    big_raw = events.encode_request(big, {"x": np.ones((rows, 16), np.float32)})
    assert 3_400_000 < len(big_raw) < settings.max_message_bytes
    good = [f"good-{settings.app_id}-{i}" for i in range(50)]
    try:
        partitions = [TopicPartition(topics.replies, p) for p in range(settings.reply_partitions)]
        replies.assign(partitions)
        await replies.seek_to_end(*partitions)
        for tp in partitions:
            await replies.position(tp)
        # One key: the big event and the 50 after it share a partition, in order.
        sent = await (await producer.send(topics.requests, big_raw, key=b"one-caller"))
        for i, request_id in enumerate(good):
            header = InferenceRequest(request_id=request_id, model="tiny", correlation_id=request_id)
            await producer.send(topics.requests, events.encode_request(header, tiny_input(seed=i)), key=b"one-caller")
        await producer.flush()
        answered: dict[str, InferenceResult] = {}
        deadline = time.monotonic() + 120
        while len(answered) < len(good) + 1 and time.monotonic() < deadline:
            for records in (await replies.getmany(timeout_ms=500)).values():
                for record in records:
                    result = events.decode_result(record.value).header
                    if result.correlation_id in {*good, "big"}:
                        answered[result.correlation_id] = result
    finally:
        await producer.stop()
        await replies.stop()

    assert sorted(answered) == sorted([*good, "big"]), f"{len(answered)} answered:\n{worker.log()[-3000:]}"
    assert all(answered[g].status == Status.OK for g in good)
    assert answered["big"].error is not None and answered["big"].error.code == ErrorCode.UNKNOWN_MODEL
    letter = (await dead_letters_of(settings, {big.request_id}))[big.request_id].letter
    assert letter.reason == ErrorCode.UNKNOWN_MODEL and letter.redacted
    assert letter.original_b64 is None
    assert letter.original_ref == f"s3://{settings.s3_bucket}/deadletters/{topics.requests}/{sent.partition}/{sent.offset}.bin"
    stored = await ObjectStore(settings).aget(letter.original_ref)
    assert token.encode() not in stored and token.split(".")[1].encode() not in stored
    original = events.decode_request(stored)
    assert original.header.credentials is None and original.header.request_id == big.request_id
    assert original.tensors["x"].shape == (rows, 16)
    assert len(events.encode_dead_letter(letter)) < 4096
    assert worker.proc.poll() is None
    assert "Restarting dead Agent" not in worker.log()


async def test_a_dead_letter_carries_no_credentials(start_worker, settings):
    topics = Topics(settings.topic_prefix)
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
    token = bearer()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    expired = {f"expired-{form}-{settings.app_id}": form for form in ("binary", "json")}
    try:
        for request_id, form in expired.items():
            header = InferenceRequest(request_id=request_id, model="tiny", deadline_ms=events.now_ms() - 1000,
                                      credentials=Credentials(authorization=token, api_key=API_KEY))
            raw = events.encode_request(header, tiny_input(), binary=form == "binary")
            assert token.encode() in raw and API_KEY.encode() in raw
            await producer.send_and_wait(topics.requests, raw, key=request_id.encode(),
                                         headers=[("Authorization", token.encode()), ("x-api-key", API_KEY.encode()),
                                                  ("kept", b"yes")])
    finally:
        await producer.stop()
    found = await dead_letters_of(settings, set(expired))
    assert set(found) == set(expired)

    records = [r for r in await topic_records(settings, topics.deadletter)
               if any(rid.encode() in r.value for rid in expired)]
    assert len(records) == len(expired)
    for record in records:
        raw_record = record.value + b"".join(k.encode() + v for k, v in record.headers)
        for secret in (token, token.split(".")[1], API_KEY):
            assert secret.encode() not in raw_record
        assert ("kept", b"yes") in record.headers
        letter = events.decode_dead_letter(record.value)
        assert letter.reason == ErrorCode.DEADLINE_EXCEEDED and letter.redacted
        assert events.decode_request(letter.original).header.credentials is None


async def test_the_tooling_reads_and_skips_whatever_lies_on_the_dead_letter_topic(topics_ready):
    settings = topics_ready
    topics = Topics(settings.topic_prefix)
    store = ObjectStore(settings)
    store.ensure_bucket()
    request = InferenceRequest(request_id=f"redrive-{settings.app_id}", model="tiny")
    original = events.encode_request(request, tiny_input())
    # A genuine letter whose original is in S3 where the pipeline puts it, and a forged one
    # pointing elsewhere in the bucket.
    ref = store.put(object_key(topics.requests, 0, 7), original)
    genuine = DeadLetter(reason=ErrorCode.UNKNOWN_VERSION, message="m", source_topic=topics.requests,
                         source_partition=0, source_offset=7, request_id=request.request_id, original_ref=ref)
    forged = genuine.model_copy(update={"original_ref": store.put("results/tiny/other.bin", b"not yours")})
    foreign = {
        "garbage": b"\x89PNG\x1b[2J not a dead letter",
        "tombstone": None,
        "result": events.encode_result(InferenceResult(request_id="r", status=Status.OK)),
    }
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        offsets = {}
        for name, value in [*foreign.items(), ("genuine", events.encode_dead_letter(genuine)),
                            ("forged", events.encode_dead_letter(forged))]:
            offsets[name] = (await producer.send_and_wait(topics.deadletter, value, key=b"k", partition=0)).offset
    finally:
        await producer.stop()

    records = {r.offset: r for r in await read_letters(settings)}
    unreadable = [records[offsets[name]] for name in foreign]
    assert all(isinstance(r, Unreadable) for r in unreadable)
    assert "PNG" in unreadable[0].preview and "\x1b" not in unreadable[0].preview
    for record in records.values():
        assert (await describe(store, record))["position"] == record.position
    shown = await describe(store, records[offsets["genuine"]])
    assert shown["original"]["request_id"] == request.request_id

    everything = list(records.values())
    outage = settings.model_copy(update={"s3_endpoint": f"127.0.0.1:{free_port()}"})
    with pytest.raises(StoreUnreachable, match="unreachable"):
        await redrive(outage, everything)
    sent, skipped = await redrive(settings, everything)
    assert [x.offset for x in sent] == [offsets["genuine"]]
    why = {s.record.offset: s.why for s in skipped}
    assert set(why) == {offsets[name] for name in [*foreign, "forged"]}
    assert all(why[offsets[name]].startswith("unreadable") for name in foreign)
    assert "not where originals are stored" in why[offsets["forged"]]
    redriven = [r.value for r in await topic_records(settings, topics.requests)
                if r.value and request.request_id.encode() in r.value]
    assert redriven == [original]

    async def dlq(*args: str) -> str:
        return (await run_cli("dlq", *args, settings=settings, env={"COLUMNS": "300"})).output

    listed = await dlq("list")
    assert listed.count("UNREADABLE") == len(foreign)
    assert f"0:{offsets['genuine']}" in listed
    shown_garbage = await dlq("show", f"0:{offsets['garbage']}")
    assert "unreadable" in shown_garbage and "PNG" in shown_garbage
    await dlq("show", f"0:{offsets['tombstone']}")
    redriven = await dlq("redrive", "--all")
    assert "redriven 0, skipped 5" in redriven  # the genuine one was redriven above
    assert f"skipped 0:{offsets['garbage']}: unreadable" in redriven
