import numpy as np
import orjson
import pytest

from topics import events
from topics.errors import ErrorCode, EventError
from topics.events import InferenceRequest, InferenceResult, Status


def request(**kw) -> InferenceRequest:
    return InferenceRequest(request_id="r1", model="tiny", reply_to="my.replies", correlation_id="c1", **kw)


TENSORS = {
    "x": np.arange(12, dtype=np.float32).reshape(3, 4),
    "mask": np.array([[True, False, True]]),
    "ids": np.array([7, -1], dtype=np.int64),
    "half": np.ones((2, 3), dtype=np.float16),
}


@pytest.mark.parametrize("binary", [True, False])
def test_request_round_trip(binary):
    raw = events.encode_request(request(deadline_ms=123, tenant="acme"), TENSORS, binary=binary)
    decoded = events.decode_request(raw)
    assert decoded.header.request_id == "r1"
    assert decoded.header.deadline_ms == 123 and decoded.header.tenant == "acme"
    assert set(decoded.tensors) == set(TENSORS)
    for name, array in TENSORS.items():
        assert decoded.tensors[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded.tensors[name], array)


def test_binary_is_compact():
    big = {"x": np.random.default_rng(0).random((64, 128), dtype=np.float32)}
    binary = events.encode_request(request(), big)
    as_json = events.encode_request(request(), big, binary=False)
    assert len(binary) < 64 * 128 * 4 + 1024
    assert len(as_json) > 1.5 * len(binary)


def test_plain_json_from_any_client():
    raw = orjson.dumps({
        "request_id": "abc", "model": "tiny",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 2], "data": [[1.5, 2.5]]}],
    })
    decoded = events.decode_request(raw)
    np.testing.assert_array_equal(decoded.tensors["x"], np.array([[1.5, 2.5]], dtype=np.float32))


def test_result_round_trip():
    header = InferenceResult(request_id="r1", status=Status.OK, model="tiny", model_version="1",
                             timings_ms={"inference": 1.5})
    decoded = events.decode_result(events.encode_result(header, {"y": TENSORS["x"]}))
    assert decoded.header.model_version == "1" and decoded.header.timings_ms == {"inference": 1.5}
    np.testing.assert_array_equal(decoded.tensors["y"], TENSORS["x"])


def test_bundle_round_trip():
    specs, tensors = events.decode_bundle(events.encode_bundle(TENSORS))
    assert [s.name for s in specs] == list(TENSORS)
    np.testing.assert_array_equal(tensors["ids"], TENSORS["ids"])


def code_of(raw: bytes) -> ErrorCode:
    with pytest.raises(EventError) as info:
        events.decode_request(raw)
    return info.value.code


def test_garbage_is_undecodable():
    assert code_of(b"\x00\x01garbage") == ErrorCode.UNDECODABLE
    assert code_of(b"[1, 2]") == ErrorCode.UNDECODABLE
    assert code_of(events.MAGIC + b"\x00\x00\xff\xff{}") == ErrorCode.UNDECODABLE


def test_missing_fields_are_a_schema_error():
    assert code_of(orjson.dumps({"model": "tiny"})) == ErrorCode.INVALID_SCHEMA  # no request_id
    assert code_of(orjson.dumps({"request_id": "a", "model": "tiny", "surprise": 1})) == ErrorCode.INVALID_SCHEMA


def test_tensor_bytes_must_fit_the_shape():
    raw = events.encode_request(request(), {"x": np.zeros((2, 2), np.float32)})
    header, payload = events.unframe(raw)
    header["inputs"][0]["shape"] = [2, 3]
    assert code_of(events.frame(header, bytes(payload))) == ErrorCode.INVALID_TENSOR
    header["inputs"][0]["shape"] = [2, 2]
    assert code_of(events.frame(header, bytes(payload)[:8])) == ErrorCode.INVALID_TENSOR


@pytest.mark.parametrize("spec", [
    {"name": "x", "dtype": "complex64", "shape": [1], "data": [1]},
    {"name": "x", "dtype": "float32", "shape": [2], "data": [1.0]},
    {"name": "x", "dtype": "float32", "shape": [-1], "data": [1.0]},
    {"name": "x", "dtype": "float32", "shape": [1], "data": ["a"]},
    {"name": "x", "dtype": "float32", "shape": [1]},
])
def test_bad_json_tensors(spec):
    raw = orjson.dumps({"request_id": "a", "model": "tiny", "inputs": [spec]})
    assert code_of(raw) == ErrorCode.INVALID_TENSOR


def test_duplicate_tensor_names_are_refused():
    raw = orjson.dumps({"request_id": "a", "model": "tiny", "inputs": [
        {"name": "x", "dtype": "float32", "shape": [1], "data": [1.0]},
        {"name": "x", "dtype": "float32", "shape": [1], "data": [2.0]},
    ]})
    assert code_of(raw) == ErrorCode.INVALID_TENSOR


def test_reply_address_of_a_broken_event():
    raw = orjson.dumps({"request_id": "r9", "reply_to": "t", "correlation_id": "c", "model": 5})
    assert events.reply_address(raw) == ("r9", "t", "c")
    assert events.reply_address(b"\xff") == (None, None, None)
    # Only what the schema would accept is used to answer.
    raw = orjson.dumps({"request_id": "r" * 129, "reply_to": "t\x00", "correlation_id": ["c"]})
    assert events.reply_address(raw) == (None, None, None)


@pytest.mark.parametrize("change", [
    {"request_id": "r\x00"}, {"correlation_id": "c\x00"}, {"batch_id": "b\n"}, {"model": "tiny\x1b[2J"},
    {"correlation_id": "c" * 257}, {"reply_to": "t\x00"}, {"inputs_ref": "s3://b/" + "k" * 1024},
    {"created_ms": -1}, {"deadline_ms": 10**18}, {"credentials": {"api_key": "k\x00"}},
])
def test_caller_strings_are_bounded_and_printable_and_times_in_range(change):
    raw = orjson.dumps({"request_id": "r1", "model": "tiny", "inputs": [], **change})
    assert code_of(raw) == ErrorCode.INVALID_SCHEMA


def test_error_messages_never_carry_control_characters():
    raw = orjson.dumps({"request_id": "r1", "model": "tiny", "\x00\x1b[31m": 1})
    with pytest.raises(EventError) as caught:
        events.decode_request(raw)
    assert caught.value.message.isprintable() and "\x00" not in str(caught.value)


def test_shapes_of_more_than_32_dimensions_are_refused():
    raw = orjson.dumps({"request_id": "r1", "model": "tiny", "inputs": [
        {"name": "x", "dtype": "float32", "shape": [1] * 33, "data": [1.0]}]})
    assert code_of(raw) in (ErrorCode.INVALID_SCHEMA, ErrorCode.INVALID_TENSOR)
