"""The pipeline's stages on whole chunks, without Kafka: consumed records are handed over as
`Message`s and what a stage sends lands in an in-memory outbox. PostgreSQL (claims, results),
Redis (rate limits) and onnxruntime are the real ones."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator

import jwt
import numpy as np
import pytest

from infra.local.harness import tiny_input
from streams.gate.gatekeeper import Gatekeeper
from streams.kafka.outbox import Headers
from streams.registry.records import ModelRegistry, load_repository
from streams.storage.schema import migrate
from streams.worker.failures import VersionLoading
from streams.worker.message import Message
from streams.worker.pipeline import Pipeline
from topics import events
from topics.errors import ErrorCode
from topics.events import Credentials, InferenceRequest, Status
from topics.names import Topics
from topics.seal import SEAL_HEADER

pytestmark = pytest.mark.integration
SECRET = "stage-test-hs256-secret-of-enough-length-0123456789"


class MemoryOutbox:
    """The outbox's interface in memory: every send confirmed at once; what was sent, in order,
    and how often the stage flushed."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, Headers]] = []
        self.flushes = 0

    async def put(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> None:
        self.sent.append((topic, key, value, headers or []))

    async def flush(self) -> None:
        self.flushes += 1

    def to(self, topic: str) -> list[tuple[str, bytes | None, bytes, Headers]]:
        return [record for record in self.sent if record[0] == topic]


@pytest.fixture
async def pipeline(settings) -> AsyncIterator[Pipeline]:
    """A pipeline serving tiny with auth on, started without its Kafka connections."""
    settings = settings.model_copy(update={
        "auth_required": True, "jwt_hs_secret": SECRET, "jwt_algorithms": ["HS256"],
        "jwt_issuer": "", "jwt_audience": ""})
    pipeline = Pipeline(settings, ModelRegistry(), serve=["tiny"], gatekeeper=Gatekeeper(settings))
    await migrate(settings.postgres_dsn)
    await pipeline.results.start()
    assert pipeline.gatekeeper is not None
    await pipeline.gatekeeper.start(pipeline.results.pool)
    info = load_repository(settings.model_repository, ["tiny"])[0]
    pipeline.registry.apply(info)
    await pipeline.inference.on_registry_change(info)
    assert info.key in pipeline.inference.servers
    try:
        yield pipeline
    finally:
        await pipeline.stop()


def credentials(tenant: str) -> Credentials:
    now = int(time.time())
    token = jwt.encode({"tenant": tenant, "scope": "infer", "sub": tenant, "iat": now, "exp": now + 300},
                       SECRET, algorithm="HS256")
    return Credentials(authorization=f"Bearer {token}")


def request_records(topic: str, bodies: list[bytes]) -> list[Message]:
    return [Message(body, None, topic, 0, offset) for offset, body in enumerate(bodies)]


def new_request(model: str, tenant: str, **fields) -> InferenceRequest:
    return InferenceRequest(request_id=events.new_request_id(), model=model, credentials=credentials(tenant),
                            **fields)


def tiny_request(tenant: str, seed: int, **fields) -> tuple[InferenceRequest, bytes]:
    request = new_request("tiny", tenant, **fields)
    return request, events.encode_request(request, tiny_input(seed=seed))


def replies(outbox: MemoryOutbox, pipeline: Pipeline) -> dict[str, events.Result]:
    decoded = [events.decode_result(value) for _, _, value, _ in outbox.to(pipeline.topics.replies)]
    return {r.header.request_id: r for r in decoded}


async def test_a_chunk_is_admitted_whole_and_its_rate_limit_stays_exact(pipeline):
    """Two tenants in one chunk of 40, one with a limit of 15: one authentication per distinct
    credentials, 15 of its 20 admitted, the other's 20 all; every admitted request answered by
    the model in this worker (one hop: nothing sent to the model topic), one flush."""
    assert pipeline.gatekeeper is not None and pipeline.gatekeeper.tenant_limits is not None
    tenants = [f"stage-{time.time_ns()}-{i}" for i in range(2)]
    await pipeline.gatekeeper.tenant_limits.set(tenants[0], 15)
    sent = [tiny_request(tenants[i % 2], i) for i in range(40)]
    calls = Counter[str]()
    authenticator, limiter = pipeline.gatekeeper._authenticator, pipeline.gatekeeper.limiter
    assert authenticator is not None
    authenticate, script = authenticator.authenticate, limiter._script

    async def counted_authenticate(credentials):
        calls["authenticate"] += 1
        return await authenticate(credentials)

    async def counted_script(**kwargs):
        calls["rate limit round trip"] += 1
        return await script(**kwargs)

    authenticator.authenticate = counted_authenticate  # type: ignore[method-assign]
    limiter._script = counted_script  # type: ignore[assignment]
    outbox = MemoryOutbox()
    await pipeline.intake.step(request_records(pipeline.topics.requests, [body for _, body in sent]), outbox)
    answers = replies(outbox, pipeline)
    assert len(answers) == 40 and outbox.flushes == 1
    assert calls == {"authenticate": 2, "rate limit round trip": 1}
    by_tenant = Counter((r.header.tenant, r.header.error.code if r.header.error else "ok") for r in answers.values())
    assert by_tenant == {(tenants[0], "ok"): 15, (tenants[0], ErrorCode.RATE_LIMITED): 5, (tenants[1], "ok"): 20}
    assert not outbox.to(Topics(pipeline.settings.topic_prefix).model("tiny"))
    expected = {r.request_id: tiny_input(seed=i)["x"] for i, (r, _) in enumerate(sent)}
    for rid, result in answers.items():
        if result.header.status == Status.OK:
            y = result.tensors["y"]
            assert y.shape == (1, 16) and np.isclose(y.sum(), 1.0, atol=1e-4), rid
            assert result.header.batch_size >= 1
    assert set(answers) == set(expected)


async def test_a_bad_request_inside_a_chunk_is_rejected_alone(pipeline):
    good = [tiny_request("stage-good", i) for i in range(6)]
    wrong_shape = new_request("tiny", "stage-good")
    unknown = new_request("no-such-model", "stage-good")
    expired = new_request("tiny", "stage-good", deadline_ms=events.now_ms() - 1)
    forged = new_request("tiny", "stage-good")
    forged.credentials = Credentials(authorization="Bearer not-a-token")
    bodies = [
        good[0][1], b"\x00not an event", good[1][1],
        events.encode_request(wrong_shape, {"x": np.zeros((1, 7), np.float32)}), good[2][1],
        events.encode_request(unknown, tiny_input()), good[3][1],
        events.encode_request(expired, tiny_input()), good[4][1],
        events.encode_request(forged, tiny_input()), good[5][1],
    ]
    outbox = MemoryOutbox()
    await pipeline.intake.step(request_records(pipeline.topics.requests, bodies), outbox)
    answers = replies(outbox, pipeline)
    codes = {rid: (r.header.error.code if r.header.error else "ok") for rid, r in answers.items()}
    assert {codes[r.request_id] for r, _ in good} == {"ok"}
    assert codes[wrong_shape.request_id] == ErrorCode.INVALID_TENSOR
    assert codes[unknown.request_id] == ErrorCode.UNKNOWN_MODEL
    assert codes[expired.request_id] == ErrorCode.DEADLINE_EXCEEDED
    assert codes[forged.request_id] == ErrorCode.UNAUTHENTICATED
    letters = [events.decode_dead_letter(value) for _, _, value, _ in outbox.to(pipeline.topics.deadletter)]
    # Dead letters for the bad events; the refused caller (bad credentials) only hears of it.
    assert Counter(letter.reason for letter in letters) == {
        ErrorCode.UNDECODABLE: 1, ErrorCode.INVALID_TENSOR: 1, ErrorCode.UNKNOWN_MODEL: 1,
        ErrorCode.DEADLINE_EXCEEDED: 1}
    assert outbox.flushes == 1


async def test_a_result_is_encoded_once_and_stored_as_it_was_sent(pipeline):
    """The reply and the results-topic record are the same bytes; the sink stores the outputs
    from those bytes and they read back equal to what the caller got."""
    sent = [tiny_request("stage-encode", i) for i in range(5)]
    outbox = MemoryOutbox()
    await pipeline.intake.step(request_records(pipeline.topics.requests, [body for _, body in sent]), outbox)
    to_caller = {key: value for _, key, value, _ in outbox.to(pipeline.topics.replies)}
    stored = outbox.to(pipeline.topics.results)
    assert len(to_caller) == len(stored) == 5
    for _, key, value, headers in stored:
        assert value is to_caller[key], "encoded twice"
        assert any(name == SEAL_HEADER for name, _ in headers)
    records = [Message(value, key, topic, 0, offset, headers)
               for offset, (topic, key, value, headers) in enumerate(stored)]
    await pipeline.sink.step(records, MemoryOutbox())
    for request, _ in sent:
        row = await pipeline.results.get(request.request_id)
        assert row is not None and row["status"] == "ok"
        _, outputs = events.decode_bundle(row["outputs"])
        caller = events.decode_result(to_caller[request.request_id.encode()]).tensors
        assert np.array_equal(outputs["y"], caller["y"])


async def test_a_version_still_loading_is_waited_for_and_one_that_failed_to_load_is_refused(pipeline):
    """A request for a version of a served model that the registry names but this worker has not
    loaded yet (just started, record just arrived) retries its chunk as for an outage; one whose
    load failed is refused UNAVAILABLE."""
    loading = pipeline.registry.resolve("tiny").model_copy(update={"version": "2"})
    pipeline.registry.apply(loading)
    request = new_request("tiny", "stage-loading", version="2")
    request.credentials = None
    topic = Topics(pipeline.settings.topic_prefix).model("tiny")
    key, value = request.request_id.encode(), events.encode_request(request, tiny_input())
    seal = pipeline.answers.sealer.seal(topic, key, value, {"rid": request.request_id, "tenant": "stage-loading",
                                                    "model": "tiny", "version": "2"})
    record = Message(value, key, topic, 0, 0, [seal])
    outbox = MemoryOutbox()
    with pytest.raises(VersionLoading):
        await pipeline.inference.step([record], outbox)
    assert not outbox.sent
    pipeline.inference.unservable.add(loading.key)
    await pipeline.inference.step([record], outbox)
    answer = replies(outbox, pipeline)[request.request_id].header
    assert answer.error is not None and answer.error.code == ErrorCode.UNAVAILABLE
