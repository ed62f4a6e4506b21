"""Dead letters: redaction of credentials, inline or by-reference originals, bounded fields, and
tolerant reading of whatever lies on the dead-letter topic."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from streams.ops.dlq import Letter, Unreadable, original_of, parse, select, unsendable
from streams.settings import Settings
from streams.storage.objects import ObjectStore
from streams.worker.deadletters import (
    CARRIED_HEADER_BYTES,
    CARRIED_KEY_BYTES,
    MESSAGE_CHARS,
    carried_headers,
    dead_letter,
)
from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import Credentials, DeadLetter, InferenceRequest, InferenceResult, Status
from topics.names import Topics

TOKEN = "Bearer eyJhbGciOiJIUzI1NiJ9.secret-token.sig"
API_KEY = "isk_abc_supersecret"


def request(credentials: bool = True) -> InferenceRequest:
    return InferenceRequest(request_id="r-1", model="tiny", reply_to="t.replies",
                            credentials=Credentials(authorization=TOKEN, api_key=API_KEY) if credentials else None)


def tensors() -> dict[str, np.ndarray]:
    return {"x": np.arange(32, dtype=np.float32).reshape(2, 16)}


@pytest.mark.parametrize("binary", [True, False])
def test_credentials_are_removed_and_the_tensors_kept(binary):
    header = request()
    raw = events.encode_request(header, tensors(), binary=binary)
    redacted, removed = events.redact_credentials(raw)
    assert removed
    assert TOKEN.encode() not in redacted and API_KEY.encode() not in redacted
    decoded = events.decode_request(redacted)
    assert decoded.header.credentials is None
    besides = {"credentials", "inputs"}  # inputs: filled in from the tensors when encoded
    assert decoded.header.model_dump(exclude=besides) == header.model_dump(exclude=besides)
    np.testing.assert_array_equal(decoded.tensors["x"], tensors()["x"])
    if binary:  # the tensor payload bytes are carried as they were, not re-packed
        assert bytes(events.unframe(redacted)[1]) == bytes(events.unframe(raw)[1])


@pytest.mark.parametrize("raw", [
    events.encode_request(request(credentials=False), tensors()),
    b"\x89PNG not an event",
    b"",
    b"ISV1\x00\x00\xff\xff{}",  # a header that runs past the end
    b"[1, 2]",
])
def test_events_without_readable_credentials_are_kept_as_they_are(raw):
    assert events.redact_credentials(raw) == (raw, False)


def test_credential_headers_are_dropped_in_any_case_and_the_rest_kept():
    headers = [("Authorization", b"Bearer x"), ("X-API-KEY", b"isk_1"), ("traceparent", b"00-ab"), ("a", b"1")]
    kept, redacted, dropped = carried_headers(headers)
    assert kept == [("traceparent", b"00-ab"), ("a", b"1")]
    assert (redacted, dropped) == (True, 0)
    assert carried_headers([("a", b"1")]) == ([("a", b"1")], False, 0)


def test_headers_over_the_carried_size_are_left_out_and_counted():
    big = ("big", b"x" * CARRIED_HEADER_BYTES)
    kept, redacted, dropped = carried_headers([("a", b"1"), big, ("b", b"2")])
    assert kept == [("a", b"1"), ("b", b"2")]
    assert (redacted, dropped) == (False, 1)


@dataclass
class Record:
    value: bytes
    key: bytes | None = b"k"
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    topic: str = "t.requests"
    partition: int = 2
    offset: int = 41


class Bucket:
    """Stands in for ObjectStore.aput: what was written, by key."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def put(self, key: str, data: bytes) -> str:
        self.objects[key] = data
        return f"s3://bucket/{key}"


def write(record: Record, message: str = "no such model", request_id: str | None = "r-1",
          settings: Settings | None = None) -> tuple[DeadLetter, bytes | None, list[tuple[str, bytes]], Bucket]:
    bucket = Bucket()
    letter, key, headers = asyncio.run(dead_letter(record, ErrorCode.UNKNOWN_MODEL, message, request_id, bucket.put,
                                                   settings or Settings()))
    return letter, key, headers, bucket


def test_a_small_original_travels_inline_redacted():
    raw = events.encode_request(request(), tensors())
    letter, key, _, bucket = write(Record(raw, headers=[("authorization", b"Bearer x")]))
    assert bucket.objects == {}
    assert letter.original_ref is None and letter.redacted
    assert letter.original == events.redact_credentials(raw)[0]
    assert letter.original_bytes == len(letter.original)
    assert key == b"k"


def test_an_original_over_the_inline_size_goes_to_s3_under_its_source_position():
    raw = events.encode_request(request(), {"x": np.zeros((300, 16), np.float32)})  # ~19 KB
    letter, _, _, bucket = write(Record(raw), settings=Settings(deadletter_inline_bytes=16 * 1024))
    assert letter.original_b64 is None
    assert letter.original_ref == "s3://bucket/deadletters/t.requests/2/41.bin"
    stored = bucket.objects["deadletters/t.requests/2/41.bin"]
    assert stored == events.redact_credentials(raw)[0] and TOKEN.encode() not in stored
    assert letter.redacted and letter.original_bytes == len(stored)
    encoded = events.encode_dead_letter(letter)
    assert len(encoded) < 2048 and TOKEN.encode() not in encoded


def test_the_inline_size_never_exceeds_half_the_message_limit():
    letter, *_ = write(Record(b"x" * 3000), settings=Settings(deadletter_inline_bytes=1 << 30, max_message_bytes=4096))
    assert letter.original_ref is not None


def test_every_field_from_the_event_is_bounded():
    huge = "m" * (50 * MESSAGE_CHARS)
    record = Record(b"garbage", key=b"k" * (CARRIED_KEY_BYTES + 1),
                    headers=[(f"h{i}", b"v" * 1024) for i in range(200)])
    letter, key, headers, _ = write(record, message=huge, request_id="r" * 5000)
    assert len(letter.message) < MESSAGE_CHARS + 40 and letter.message.startswith("m" * MESSAGE_CHARS)
    assert letter.request_id is None  # no request id is that long
    assert key is None and letter.key_dropped
    assert sum(len(k) + len(v) for k, v in headers) <= CARRIED_HEADER_BYTES
    assert letter.headers_dropped == 200 - len(headers) > 0


def test_letters_written_before_references_still_decode():
    old = orjson.dumps({"schema_version": 1, "reason": "UNKNOWN_MODEL", "message": "m", "source_topic": "t.requests",
                        "source_partition": 0, "source_offset": 3, "request_id": "r",
                        "original_b64": base64.b64encode(b"{}").decode(), "failed_ms": 1})
    letter = events.decode_dead_letter(old)
    assert letter.original == b"{}" and letter.original_ref is None and not letter.redacted


LETTER = {"reason": "INTERNAL", "message": "m", "source_topic": "t.requests", "source_partition": 0,
          "source_offset": 5}


def test_a_letter_carries_at_most_one_original():
    with pytest.raises(ValidationError):
        DeadLetter.model_validate({**LETTER, "original_b64": "", "original_ref": "s3://b/k"})
    with pytest.raises(ValueError, match="not kept"):
        _ = DeadLetter.model_validate(LETTER).original


@pytest.mark.parametrize(("fields", "why"), [
    ({}, "not kept"),
    ({"original_b64": "not base64!"}, "base64|Incorrect padding|Invalid"),
    ({"original_b64": base64.b64encode(b"{}").decode(), "original_bytes": 9}, "the letter says 9"),
    ({"original_ref": "s3://inferstream/results/tiny/x.bin"}, "not where originals are stored"),
    ({"original_ref": "s3://inferstream/deadletters/t.requests/0/6.bin"}, "not where originals are stored"),
])
def test_an_original_that_is_not_whole_or_not_where_the_pipeline_puts_it_is_unavailable(fields, why):
    letter = DeadLetter.model_validate({**LETTER, **fields})
    with pytest.raises(EventError, match=why):
        asyncio.run(original_of(ObjectStore(Settings()), letter))


def test_only_topics_the_pipeline_consumes_are_redriven_to():
    topics = Topics("t")
    letter = DeadLetter.model_validate({**LETTER, "original_b64": ""})
    for source in ("t.requests", "t.results", "t.batches", "t.model.tiny"):
        assert unsendable(topics, letter.model_copy(update={"source_topic": source})) is None
    for source in ("t.registry", "t.deadletter", "t.replies", "other.requests", "t.model.x/../y"):
        assert unsendable(topics, letter.model_copy(update={"source_topic": source}))


def test_any_record_on_the_topic_is_read_and_what_is_no_letter_is_unreadable():
    letter = DeadLetter(reason=ErrorCode.UNKNOWN_MODEL, message="m", source_topic="t.requests", source_partition=0,
                        source_offset=0, original_b64="e30=")
    result = events.encode_result(InferenceResult(request_id="r", status=Status.OK))
    records = [
        parse(0, 0, None, [], events.encode_dead_letter(letter)),
        parse(0, 1, None, [], b"\xff\x00\x1b[2J garbage"),
        parse(0, 2, None, [], None),
        parse(0, 3, None, [], b""),
        parse(0, 4, None, [], result),
        parse(0, 5, None, [], orjson.dumps({"request_id": "r", "status": "ok"})),
    ]
    assert isinstance(records[0], Letter) and records[0].letter == letter
    unreadable = records[1:]
    assert all(isinstance(r, Unreadable) and r.problem for r in unreadable)
    assert [r.position for r in unreadable] == ["0:1", "0:2", "0:3", "0:4", "0:5"]
    assert "\x1b" not in unreadable[0].preview and "garbage" in unreadable[0].preview
    assert "no value" in unreadable[1].problem and "empty" in unreadable[2].problem
    assert select(records, reasons={"UNKNOWN_MODEL"}) == records[:1]
    assert select(records, positions={(0, 4)}) == [records[4]]
