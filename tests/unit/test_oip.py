"""The Open Inference Protocol (KServe v2) codec against tritonclient's own request encoder and response decoder."""

from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from streams.registry.records import ModelInfo, TensorSignature
from streams.serving.oip import (
    InferBody,
    Limits,
    ProtocolError,
    build_infer_response,
    datatype_to_dtype,
    dtype_to_datatype,
    model_metadata,
    parse_infer_request,
)
from topics.errors import ErrorCode, EventError

ARRAYS = {
    "FP32": np.array([[0.1, -2.5, 3e38], [0.0, 1.0, -1e-30]], dtype=np.float32),
    "INT64": np.array([[2**62, -(2**62), 0, 7]], dtype=np.int64),
    "BOOL": np.array([True, False, True]),
    "UINT8": np.arange(256, dtype=np.uint8).reshape(16, 16),
    "FP16": np.array([[0.5, -1.25], [65504.0, 0.0]], dtype=np.float16),
}


def triton_input(name: str, array: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), dtype_to_datatype(array.dtype))
    return tensor.set_data_from_numpy(array, binary_data=binary)


def encode(inputs, **kw) -> tuple[bytes, int | None]:
    return triton.InferenceServerClient.generate_request_body(inputs, **kw)


def respond(outputs: dict[str, np.ndarray], body: InferBody) -> triton.InferResult:
    response, header_length = build_infer_response("tiny", "3", body.id, outputs, body)
    return triton.InferResult.from_response_body(response, header_length=header_length)


def raw_request(**request) -> bytes:
    return orjson.dumps(request)


def fp32_input(**spec) -> dict:
    return {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0], **spec}


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("datatype", list(ARRAYS))
def test_inputs_round_trip(datatype, binary):
    array = ARRAYS[datatype]
    body, header_length = encode([triton_input("x", array, binary)])
    assert (header_length is not None) == binary
    parsed = parse_infer_request(body, header_length)
    assert parsed.inputs["x"].dtype == array.dtype
    np.testing.assert_array_equal(parsed.inputs["x"], array)


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_inputs_round_trip_as_tritonclient_sends_them(binary):
    """BYTES (an encoded image per element): binary as 4-byte little-endian lengths and bytes,
    JSON as strings; any bytes in binary, UTF-8 in JSON."""
    array = np.array([[b"\x89PNG\r\n\x1a\n\0\xff" if binary else b"abc"], [b""], [b"de"]], dtype=object)
    body, header_length = encode([triton_input("image", array, binary)])
    parsed = parse_infer_request(body, header_length)
    got = parsed.inputs["image"]
    assert got.dtype == object and got.shape == (3, 1) and got.tolist() == array.tolist()
    assert all(type(item) is bytes for item in got.ravel())


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_outputs_round_trip(binary):
    parsed = parse_infer_request(raw_request(inputs=[fp32_input()], parameters={"binary_data_output": binary}), None)
    strings = np.array([b"cat", b"tabby"], dtype=object)
    result = respond({"labels": strings}, parsed)
    assert result.get_output("labels")["datatype"] == "BYTES"
    got = result.as_numpy("labels").tolist()  # tritonclient gives JSON strings back as str
    assert [item if isinstance(item, bytes) else item.encode() for item in got] == [b"cat", b"tabby"]


def test_json_and_binary_inputs_mixed():
    arrays = {"a": ARRAYS["FP32"], "b": ARRAYS["BOOL"], "c": ARRAYS["INT64"], "d": ARRAYS["FP16"]}
    inputs = [triton_input(name, array, binary=name in "ac") for name, array in arrays.items()]
    parsed = parse_infer_request(*encode(inputs, request_id="req-7", parameters={"tenant": "acme"}))
    assert list(parsed.inputs) == list(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(parsed.inputs[name], array)
    assert parsed.id == "req-7"
    assert parsed.parameters["tenant"] == "acme"


def test_nested_json_data_is_accepted():
    body = raw_request(inputs=[fp32_input(shape=[2, 2], data=[[1, 2], [3, 4.5]])])
    np.testing.assert_array_equal(parse_infer_request(body, None).inputs["x"], [[1, 2], [3, 4.5]])


def test_empty_tensors():
    array = np.zeros((0, 3), dtype=np.float32)
    for binary in (True, False):
        parsed = parse_infer_request(*encode([triton_input("x", array, binary)]))
        assert parsed.inputs["x"].shape == (0, 3)
        result = respond({"y": array}, parsed)
        assert result.as_numpy("y").shape == (0, 3)


def test_no_requested_outputs_returns_all_in_binary():
    # tritonclient asks for binary_data_output when the caller names no outputs.
    parsed = parse_infer_request(*encode([triton_input("x", ARRAYS["FP32"], binary=False)]))
    assert parsed.requested_outputs is None and parsed.binary_default
    outputs = {name.lower(): array for name, array in ARRAYS.items()}
    response, header_length = build_infer_response("tiny", "3", None, outputs, parsed)
    assert header_length is not None
    result = triton.InferResult.from_response_body(response, header_length=header_length)
    for name, array in outputs.items():
        assert result.get_output(name)["parameters"] == {"binary_data_size": array.nbytes}
        assert result.as_numpy(name).dtype == array.dtype
        np.testing.assert_array_equal(result.as_numpy(name), array)


def test_requested_outputs_subset_in_json_and_binary():
    outputs = [triton.InferRequestedOutput("int64", binary_data=False), triton.InferRequestedOutput("fp16")]
    inputs = [triton_input("x", ARRAYS["FP32"], True)]
    parsed = parse_infer_request(*encode(inputs, outputs=outputs, request_id="r1"))
    assert parsed.requested_outputs == ["int64", "fp16"]
    assert parsed.binary_outputs == {"fp16"}
    result = respond({name.lower(): array for name, array in ARRAYS.items()}, parsed)
    response = result.get_response()
    assert response["model_name"] == "tiny" and response["model_version"] == "3" and response["id"] == "r1"
    assert [output["name"] for output in response["outputs"]] == ["int64", "fp16"]
    assert result.get_output("int64")["data"] == ARRAYS["INT64"].ravel().tolist()
    np.testing.assert_array_equal(result.as_numpy("int64"), ARRAYS["INT64"])
    np.testing.assert_array_equal(result.as_numpy("fp16"), ARRAYS["FP16"])
    assert result.as_numpy("fp32") is None


@pytest.mark.parametrize("datatype", list(ARRAYS))
def test_json_outputs_round_trip(datatype):
    parsed = parse_infer_request(raw_request(inputs=[fp32_input()], outputs=[{"name": "y"}]), None)
    response, header_length = build_infer_response("tiny", "3", None, {"y": ARRAYS[datatype]}, parsed)
    assert header_length is None
    result = triton.InferResult.from_response_body(response)
    assert result.get_output("y")["datatype"] == datatype
    np.testing.assert_array_equal(result.as_numpy("y"), ARRAYS[datatype])


def test_output_binary_data_overrides_request_default():
    request = raw_request(
        inputs=[fp32_input()], parameters={"binary_data_output": True},
        outputs=[{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
    )
    assert parse_infer_request(request, None).binary_outputs == {"b"}


def test_non_contiguous_outputs_are_sent_in_c_order():
    array = np.arange(12, dtype=np.int32).reshape(3, 4).T
    for binary in (True, False):
        outputs = [triton.InferRequestedOutput("y", binary_data=binary)]
        parsed = parse_infer_request(*encode([triton_input("x", ARRAYS["FP32"], True)], outputs=outputs))
        np.testing.assert_array_equal(respond({"y": array}, parsed).as_numpy("y"), array)


def test_unknown_requested_output():
    parsed = parse_infer_request(raw_request(inputs=[fp32_input()], outputs=[{"name": "nope"}]), None)
    with pytest.raises(ProtocolError, match="'nope'"):
        build_infer_response("tiny", "3", None, {"y": ARRAYS["FP32"]}, parsed)


def test_datatype_mapping():
    for datatype, array in ARRAYS.items():
        assert datatype_to_dtype(datatype) == array.dtype
        assert dtype_to_datatype(array.dtype) == datatype
        assert dtype_to_datatype(array.dtype.name) == datatype
    assert dtype_to_datatype(np.float64) == "FP64"
    assert datatype_to_dtype("BYTES") == np.dtype(object) and dtype_to_datatype(np.dtype(object)) == "BYTES"
    with pytest.raises(ProtocolError, match="not supported"):
        datatype_to_dtype("BF16")
    with pytest.raises(ProtocolError, match="unknown datatype"):
        datatype_to_dtype("FP8")
    with pytest.raises(EventError) as error:
        dtype_to_datatype(np.uint16)
    assert error.value.code == ErrorCode.INVALID_TENSOR


def test_model_metadata():
    info = ModelInfo(
        name="tiny", version="3", max_batch_size=8, path=Path("repo/tiny/3/model.onnx"),
        inputs=[TensorSignature(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSignature(name="y", dtype="int64", shape=[-1])],
    )
    assert model_metadata(info, ["1", "3"]) == {
        "name": "tiny", "versions": ["1", "3"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "INT64", "shape": [-1]}],
    }


def test_brackets_inside_strings_do_not_count_as_nesting():
    body = raw_request(id="[" * 1000 + '\\"{', inputs=[fp32_input()])
    assert parse_infer_request(body, None).id == "[" * 1000 + '\\"{'


def test_deep_nesting_is_rejected_without_parsing(monkeypatch):
    import streams.serving.oip as oip

    def parse(_: bytes) -> None:
        raise AssertionError("the header was handed to the JSON parser")

    monkeypatch.setattr(oip.orjson, "loads", parse)
    depth = 1_000_000  # far past any recursion limit: the depth is measured without recursing
    data = b"[" * depth + b"1" + b"]" * depth
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":' + data + b"}]}"
    with pytest.raises(ProtocolError, match="deeper than 32"):
        parse_infer_request(body, None)


def binary_header(size_claimed: int, datatype: str = "FP32") -> bytes:
    spec = {"name": "x", "datatype": datatype, "shape": [2], "parameters": {"binary_data_size": size_claimed}}
    return raw_request(inputs=[spec])


def bytes_body(payload: bytes) -> tuple[bytes, int]:
    """A BYTES input of shape [2] whose serialized elements are `payload`."""
    header = binary_header(len(payload), "BYTES")
    return header + payload, len(header)


def binary_body(size_claimed: int, payload: bytes) -> tuple[bytes, int]:
    header = binary_header(size_claimed)
    return header + payload, len(header)


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b'{"inputs": [', None, "not valid JSON"),
        (b"[1, 2]", None, "must be an object"),
        (raw_request(id="r1"), None, "needs an 'inputs' list"),
        (raw_request(inputs={"x": 1}), None, "needs an 'inputs' list"),
        (raw_request(inputs=[{"datatype": "FP32"}]), None, r"inputs\[0\] must be an object"),
        (raw_request(inputs=[fp32_input(), fp32_input()]), None, "input 'x' appears twice"),
        (raw_request(inputs=[fp32_input(datatype="FP8")]), None, "input 'x': unknown datatype 'FP8'"),
        (raw_request(inputs=[fp32_input(datatype="BF16", data=[1, 2])]), None, "'BF16' is not supported"),
        (raw_request(inputs=[fp32_input(datatype="BYTES", data=["a", 2])]), None, "must hold strings for BYTES"),
        (raw_request(inputs=[fp32_input(datatype="BYTES", data=["a"])]), None, "'data' has 1 values but"),
        (raw_request(inputs=[fp32_input(datatype="BYTES", data=["a", "b", "c"])]), None, "more than 2 values"),
        (*bytes_body(b"\x09\0\0\0abcdefgh"), "element 0 runs past the end"),
        (*bytes_body(b"\x01\0\0\0a\x01\0\0\0bc"), "1 bytes after its last element"),
        (*bytes_body(b"\x01\0\0"), "3 bytes cannot hold 2 elements"),
        (raw_request(inputs=[fp32_input(shape=[2, -1])]), None, "'shape' must be a list"),
        (raw_request(inputs=[fp32_input(shape="2")]), None, "'shape' must be a list"),
        (raw_request(inputs=[fp32_input(shape=[0, 2**40], data=[])]), None, "'shape' must be a list"),
        (raw_request(inputs=[fp32_input(shape=[3])]), None, "'data' has 2 values but the shape needs 3"),
        (raw_request(inputs=[fp32_input(shape=[2, 2], data=[[1], [3, 4]])]), None, "ragged"),
        (raw_request(inputs=[fp32_input(data=["1", "2"])]), None, "must hold numbers for FP32"),
        (raw_request(inputs=[fp32_input(data=[1, None])]), None, "must hold numbers for FP32"),
        (raw_request(inputs=[fp32_input(datatype="INT64", data=[1, 2.5])]), None, "must hold integers"),
        (raw_request(inputs=[fp32_input(datatype="UINT8", data=[1, 256])]), None, "outside the range"),
        (raw_request(inputs=[fp32_input(datatype="BOOL", data=[1, 0])]), None, "must hold booleans"),
        (raw_request(inputs=[fp32_input(data=None)]), None, "needs a 'data' list"),
        (raw_request(inputs=[fp32_input(parameters={"shared_memory_region": "r"})]), None, "not supported"),
        (raw_request(inputs=[fp32_input(parameters={"binary_data_size": 8})]), None, "both 'data' and"),
        (raw_request(inputs=[fp32_input()], outputs=[{"name": "y"}, {"name": "y"}]), None, "requested twice"),
        (raw_request(inputs=[fp32_input()], outputs=[{"name": "y", "parameters": {"binary_data": 1}}]),
         None, "output 'y': 'binary_data' must be a boolean"),
        (raw_request(inputs=[fp32_input()], parameters={"binary_data_output": 1}), None, "must be a boolean"),
        (raw_request(inputs=[fp32_input()], id=7), None, "'id' must be a string"),
        (*binary_body(12, bytes(12)), "binary_data_size is 12 bytes but the shape needs 8"),
        (*binary_body(8, bytes(4)), "runs past the end"),
        (*binary_body(8, bytes(12)), "4 bytes after the JSON header belong to no input"),
        (binary_body(8, bytes(8))[0], None, "not valid JSON"),
        (binary_body(8, bytes(8))[0], 10_000, "does not fit"),
    ],
)
def test_malformed_requests(body, header_length, message):
    with pytest.raises(ProtocolError, match=message):
        parse_infer_request(body, header_length)


def test_binary_size_without_binary_section():
    with pytest.raises(ProtocolError, match="input 'x': binary data runs past the end"):
        parse_infer_request(binary_header(8), None)


def test_binary_bool_bytes_must_be_0_or_1():
    header = binary_header(2, "BOOL")
    with pytest.raises(ProtocolError, match="BOOL bytes"):
        parse_infer_request(header + b"\x01\x02", len(header))


def test_element_limit_counts_every_input():
    zeros = np.zeros(6, np.float32)
    body, header_length = encode([triton_input("a", zeros, True), triton_input("b", zeros, False)])
    assert len(parse_infer_request(body, header_length, Limits(max_elements=12)).inputs) == 2
    with pytest.raises(ProtocolError, match="input 'b': the request holds more than 11 tensor elements"):
        parse_infer_request(body, header_length, Limits(max_elements=11))
