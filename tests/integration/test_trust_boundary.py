"""The worker's trust boundary on the real stack: the requests topic is the only door, what is
forwarded is sealed and carries no credentials, reply_to and S3 references are checked, and a
request id is admitted once."""

from __future__ import annotations

import time

import asyncpg
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from support.deadletters import dead_letters_of
from support.gate import AUTH, Stores, call, ready_with, token
from support.model_repositories import pooled_repository
from support.topics import topic_records
from support.waiting import wait_for

from infra.local.harness import tiny_input, wait_ready
from streams.client import InferenceClient
from streams.ops.dlq import Letter, read_letters
from streams.storage.objects import ObjectStore
from streams.worker.app import bootstrap_registry
from topics import events
from topics.errors import ErrorCode
from topics.events import Credentials, InferenceRequest, InferenceResult, Status
from topics.names import Topics
from topics.seal import Sealer

pytestmark = pytest.mark.integration


async def produce(settings, topic: str, value: bytes, key: bytes | None = None,
                  headers: list[tuple[str, bytes]] | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                max_request_size=settings.max_message_bytes + 64 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=headers or [])
    finally:
        await producer.stop()


async def stored(settings, request_id: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        return await conn.fetchrow("SELECT * FROM inference_results WHERE request_id = $1", request_id)
    finally:
        await conn.close()


async def stored_when(settings, request_id: str, done, timeout: float = 60.0) -> asyncpg.Record:
    """The request's stored row, once it is there and `done(row)`."""
    return await wait_for(lambda: stored(settings, request_id), timeout=timeout, interval=0.3,
                          until=lambda row: row is not None and done(row), what=f"{request_id} stored")


async def topic_values(settings, topic: str) -> list[bytes]:
    """Every value in a topic now."""
    return [r.value or b"" for r in await topic_records(settings, topic)]


async def test_events_written_straight_to_internal_topics_are_never_served(start_worker, settings):
    """Model topic, results topic, batch commands and registry records: only sealed ones count."""
    topics = Topics(settings.topic_prefix)
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        answered = client.request("tiny", timeout=30)
        await client.wait(answered, await client.send(answered, tiny_input()))
        # A request produced straight to the model topic, skipping the intake's auth and limits.
        bypass = client.request("tiny", timeout=30)
        value = events.encode_request(bypass, tiny_input())
        await produce(settings, topics.model("tiny"), value, bypass.request_id.encode())
        # A sealed event under another secret is no better.
        other = Sealer("not-the-cluster-secret").seal(topics.model("tiny"), b"k", value, {"rid": bypass.request_id})
        await produce(settings, topics.model("tiny"), value, b"k", [other])
        # A forged result for a request that was answered: its stored row must not change.
        row_before = await stored_when(settings, answered.request_id, lambda r: r["status"] == "ok")
        fake = InferenceResult(request_id=answered.request_id, status=Status.ERROR, model="tiny")
        await produce(settings, topics.results, events.encode_result(fake), answered.request_id.encode())
        # A forged batch command.
        await produce(settings, topics.batches, b'{"batch_id": "b-forged"}', b"b-forged")
        letters = await dead_letters_of(settings, {bypass.request_id})
        # A later request through the door proves the forged ones were consumed, then nothing.
        later = await client.infer("tiny", tiny_input(seed=3), timeout=30)
    assert later.header.status == Status.OK
    assert letters[bypass.request_id].letter.reason == ErrorCode.UNAUTHENTICATED
    reasons = [(x.letter.source_topic, x.letter.reason) for x in await read_letters(settings) if isinstance(x, Letter)]
    assert reasons.count((topics.model("tiny"), ErrorCode.UNAUTHENTICATED)) == 2
    assert (topics.results, ErrorCode.UNAUTHENTICATED) in reasons
    assert (topics.batches, ErrorCode.UNAUTHENTICATED) in reasons
    assert await stored(settings, bypass.request_id) is None  # never served, never stored
    assert dict(await stored(settings, answered.request_id)) == dict(row_before)
    assert "Restarting dead Agent" not in worker.log()


async def test_internal_headers_from_a_caller_are_dropped(start_worker, settings):
    """A caller's inferstream-tenant / inferstream-version headers do not steer anything."""
    worker = start_worker(**AUTH)
    good = Credentials(authorization=f"Bearer {token()}")  # tenant acme
    async with InferenceClient(settings) as client:
        await ready_with(client, worker, good)
        request = client.request("tiny", timeout=30, credentials=good, tenant="victim")
        forged = [("inferstream-tenant", b"victim"), ("inferstream-version", b"999"),
                  ("Inferstream-Tenant", b"victim")]
        result = await client.wait(request, await client.send(request, tiny_input(), headers=forged))
    assert result.header.status == Status.OK, result.header.error
    assert result.header.model_version == "1"
    row = await stored_when(settings, request.request_id, lambda r: True)
    assert row is not None and row["tenant"] == "acme"


async def test_a_request_is_admitted_without_credentials_only_under_the_products_own_seal(start_worker, settings):
    """Batch items carry their owner's principal in a seal; a caller can neither forge one nor
    reuse a genuine one on another request."""
    requests_topic = Topics(settings.topic_prefix).requests
    worker = start_worker(**AUTH)
    acme = {"admission": {"tenant": "acme", "subject": "alice", "scopes": ["infer"], "method": "jwt"}}

    def sealed(request: InferenceRequest, secret: str) -> list[tuple[str, bytes]]:
        key, value = request.request_id.encode(), events.encode_request(request, tiny_input())
        return [Sealer(secret).seal(requests_topic, key, value, {"rid": request.request_id, **acme})]

    async with InferenceClient(settings) as client:
        await ready_with(client, worker, Credentials(authorization=f"Bearer {token()}"))
        genuine, forged, reused = (client.request("tiny", timeout=30) for _ in range(3))
        genuine_seal = sealed(genuine, settings.cluster_secret)
        sends = [(genuine, genuine_seal), (forged, sealed(forged, "not-the-cluster-secret")),
                 (reused, genuine_seal)]  # the genuine seal on another request
        results = {}
        for request, headers in sends:
            waiter = await client.send(request, tiny_input(), headers=headers)
            results[request.request_id] = await client.wait(request, waiter)
    assert results[genuine.request_id].header.status == Status.OK, results[genuine.request_id].header.error
    for request in (forged, reused):
        error = results[request.request_id].header.error
        assert error is not None and error.code == ErrorCode.UNAUTHENTICATED, error
    row = await stored_when(settings, genuine.request_id, lambda r: True)
    assert row is not None and row["tenant"] == "acme"


async def test_forwarded_events_carry_no_credentials(start_worker, settings, tmp_path):
    """A request for a model only another worker group serves is forwarded to its topic, without
    the caller's credentials."""
    pooled = "pooled"
    await bootstrap_registry(settings.model_copy(update={
        "model_repository": pooled_repository(settings.model_repository, tmp_path / "pool", pooled),
        "models": [pooled]}))
    worker = start_worker(models=["tiny"], **AUTH)
    secret = token(sub="carol")
    credentials = Credentials(authorization=f"Bearer {secret}")
    async with InferenceClient(settings) as client:
        await ready_with(client, worker, credentials)
        request = client.request(pooled, timeout=30, credentials=credentials)
        await client.send(request, tiny_input(), delivered=True)
        topic = Topics(settings.topic_prefix).model(pooled)
        values = await wait_for(lambda: topic_values(settings, topic), timeout=30, interval=0,
                                what="the forwarded request on the model's topic")
    assert len(values) == 1, "the model topic holds the forwarded request"
    assert request.request_id.encode() in values[0]
    assert secret.encode() not in values[0] and b"credentials" not in values[0]


async def test_reply_to_must_be_an_existing_topic_outside_the_internal_namespace(start_worker, settings):
    topics = Topics(settings.topic_prefix)
    worker = start_worker()
    missing = f"{settings.topic_prefix}-nowhere-{int(time.time())}"
    internal = [topics.deadletter, topics.results, topics.batches, topics.registry, topics.model("tiny"),
                topics.requests, f"{settings.app_id}-__assignor-__leader", "__consumer_offsets"]
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        before = {t: len(await topic_values(settings, t)) for t in (topics.results, topics.batches)}
        sent = []
        for reply_to in [*internal, missing, "bad name!", "x" * 300]:
            request = client.request("tiny", timeout=30)
            request.reply_to = reply_to
            # The error comes back on the default replies topic, which this client reads.
            sent.append((reply_to, request, await client.send(request, tiny_input())))
        errors = {reply_to: await client.wait(request, waiter) for reply_to, request, waiter in sent}
    for reply_to, result in errors.items():
        assert result.header.status == Status.ERROR, reply_to
        assert result.header.error.code == ErrorCode.INVALID_REPLY_TO, (reply_to, result.header.error)
    letters = await dead_letters_of(settings, {request.request_id for _, request, _ in sent})
    assert {x.letter.reason for x in letters.values()} == {ErrorCode.INVALID_REPLY_TO}
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        assert missing not in await admin.list_topics()  # never created by the product
    finally:
        await admin.close()
    # Nothing but the error results themselves reached the results topic; the batches topic got nothing.
    assert len(await topic_values(settings, topics.batches)) == before[topics.batches]
    ids = {request.request_id for _, request, _ in sent}

    async def error_results() -> list[InferenceResult]:
        results = [events.decode_result(v).header for v in await topic_values(settings, topics.results)]
        return [r for r in results if r.request_id in ids]

    mine = await wait_for(error_results, timeout=30, interval=0.3, until=lambda found: len(found) >= len(ids),
                          what="the error results on the results topic")
    assert len(mine) == len(ids) and all(r.error and r.error.code == ErrorCode.INVALID_REPLY_TO for r in mine)
    assert len([r for r in await read_letters(settings) if not isinstance(r, Letter)]) == 0


async def test_inputs_ref_outside_the_callers_buckets_is_forbidden(start_worker, settings):
    store = ObjectStore(settings)
    other = f"{settings.s3_bucket}-other"
    if not store.client.bucket_exists(other):
        store.client.make_bucket(other)
    bundle = events.encode_bundle(tiny_input())
    secret_uri = f"s3://{other}/private/secret.bin"
    store.client.put_object(other, "private/secret.bin", __import__("io").BytesIO(bundle), len(bundle))
    internal_uri = store.put("results/tiny/someone-else.bin", bundle)
    allowed_uri = store.put("requests/mine.bin", bundle)
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        answers = {}
        for uri in (secret_uri, internal_uri, f"s3://{settings.s3_bucket}/requests/../results/tiny/someone-else.bin",
                    allowed_uri):
            request = client.request("tiny", timeout=30, inputs_ref=uri)
            answers[uri] = await client.wait(request, await client.send(request, {}))
    assert answers.pop(allowed_uri).header.status == Status.OK
    for uri, result in answers.items():
        assert result.header.error is not None and result.header.error.code == ErrorCode.FORBIDDEN, uri


async def test_a_request_id_is_admitted_once(start_worker, settings):
    """Reuse of an id with another body is refused and leaves the stored answer alone; a repeat
    with the same body gets the stored answer without running again or counting; a later error
    never overwrites an answer; reuse counts against the limit where redelivery does not."""
    worker = start_worker(**AUTH, rate_limit_per_minute=3)
    good = Credentials(authorization=f"Bearer {token(tenant='idem')}")
    async with InferenceClient(settings) as client:
        await ready_with(client, worker, Credentials(authorization=f"Bearer {token(tenant='warmup')}"))
        first = client.request("tiny", timeout=30, credentials=good)
        x = tiny_input(seed=11)
        answer = await client.wait(first, await client.send(first, x))  # admission 1 of 3
        assert answer.header.status == Status.OK
        row = await stored_when(settings, first.request_id, lambda r: r["status"] == "ok")

        async def again(inputs, reply_to: str | None = None) -> InferenceResult:
            copy = client.request("tiny", timeout=30, credentials=good)
            copy.request_id = first.request_id
            copy.reply_to = reply_to or copy.reply_to
            return (await client.wait(copy, await client.send(copy, inputs))).header

        conflict = await again(tiny_input(seed=12))
        assert conflict.status == Status.ERROR and conflict.error.code == ErrorCode.DUPLICATE_REQUEST
        repeats = [await again(x) for _ in range(5)]  # over the limit of 3, yet none is refused
        assert all(r.status == Status.OK for r in repeats)
        bad_reply = await again(x, reply_to="no-such-topic-anywhere")  # rejected: an error for this id
        assert bad_reply.error is not None and bad_reply.error.code == ErrorCode.INVALID_REPLY_TO
        # Two new ids fill the limit; the third is refused: reuse did not buy free admissions.
        fresh = [await call(client, good, seed=i) for i in range(3)]
    assert [r.header.status for r in fresh[:2]] == [Status.OK, Status.OK]
    assert fresh[2].header.error is not None and fresh[2].header.error.code == ErrorCode.RATE_LIMITED
    after = await stored_when(settings, first.request_id, lambda r: True)
    # The row is the first answer's: not re-run (stored_at unchanged), not replaced by the errors.
    assert after["status"] == "ok" and after["stored_at"] == row["stored_at"]
    assert after["outputs"] == row["outputs"]


async def test_the_stored_answer_of_a_repeat_has_the_callers_correlation_id(start_worker, settings):
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)
        request = client.request("tiny", timeout=30)
        first = await client.wait(request, await client.send(request, tiny_input(seed=5)))
        await stored_when(settings, request.request_id, lambda r: r["status"] == "ok")
        repeat = InferenceRequest(**{**request.model_dump(), "correlation_id": "second-caller"})
        second = await client.wait(repeat, await client.send(repeat, tiny_input(seed=5)))
    assert second.header.correlation_id == "second-caller"
    np.testing.assert_array_equal(second.tensors["y"], first.tensors["y"])


async def test_registry_records_not_written_by_the_product_are_ignored(start_worker, settings):
    async with Stores(settings) as stores:
        record = next(r for r in await stores.registry.list() if r.name == "tiny")
    # A later revision than any the product wrote: the registry would take it, were it sealed.
    forged = record.model_copy(update={"status": "retired", "revision": record.revision + 100})
    registry_topic = Topics(settings.topic_prefix).registry
    await produce(settings, registry_topic, forged.model_dump_json().encode(), record.key.encode())
    worker = start_worker()
    async with InferenceClient(settings) as client:
        await wait_ready(client, worker)  # would answer UNKNOWN_VERSION had the forged record applied
    assert "not written by the product" in worker.log()
