"""Codec for the Open Inference Protocol (KServe v2 / Triton HTTP): request bodies to numpy
tensors and result tensors to response bodies. Pure functions, no I/O.

A body is a JSON header, optionally followed by raw tensor bytes (the binary tensor extension):
the `Inference-Header-Content-Length` HTTP header then gives the JSON header's size, and each
binary tensor names its size in `parameters.binary_data_size`, in tensor order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from streams.registry.records import ModelInfo, TensorSignature
from topics.errors import EventError
from topics.tensors import BYTES, DTYPES, check_dtype, deserialize_bytes, dtype_name, serialize_bytes

_DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT16": "int16", "INT32": "int32",
    "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64",
    # Byte strings of any length, e.g. one encoded image per element. Binary form: each element
    # as a 4-byte little-endian length and its bytes (Triton's); JSON form: strings (UTF-8).
    "BYTES": BYTES,
}
_DTYPE_NAMES = {dtype: datatype for datatype, dtype in _DATATYPES.items()}
# In the protocol but not in inferstream: told apart from typos for a clearer error.
_UNSUPPORTED_DATATYPES = {"BF16", "UINT16", "UINT32", "UINT64"}
_MAX_RANK = 32  # numpy 1.x's limit; no served model comes close

# JSON values each kind of numpy dtype accepts: numbers for floats, integers only for integers.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_JSON_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NESTING_STEP = np.zeros(256, dtype=np.int8)
_NESTING_STEP[list(b"[{")] = 1
_NESTING_STEP[list(b"]}")] = -1


class ProtocolError(ValueError):
    """A malformed inference body; the bridge answers 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_elements: int = 16_000_000  # total tensor elements per request
    max_json_depth: int = 32  # nesting of the JSON header


@dataclass
class InferBody:
    id: str | None
    inputs: dict[str, np.ndarray]
    requested_outputs: list[str] | None  # None = all outputs
    # Requested outputs to return in binary form (their own `binary_data`, else the request's
    # `binary_data_output`); `binary_default` decides for outputs returned without being named.
    binary_outputs: set[str]
    binary_default: bool
    parameters: dict


def datatype_to_dtype(datatype: str) -> np.dtype:
    if not isinstance(datatype, str):
        raise ProtocolError(f"'datatype' must be a string; use one of {list(_DATATYPES)}")
    if datatype in _DATATYPES:
        return DTYPES[_DATATYPES[datatype]]
    if datatype in _UNSUPPORTED_DATATYPES:
        raise ProtocolError(f"datatype {datatype!r} is not supported; use one of {list(_DATATYPES)}")
    raise ProtocolError(f"unknown datatype {datatype!r}; use one of {list(_DATATYPES)}")


def dtype_to_datatype(dtype: np.dtype | str) -> str:
    """Raises EventError(INVALID_TENSOR) for dtypes inferstream does not serve."""
    if isinstance(dtype, str):
        name = dtype
    else:
        dtype = np.dtype(dtype)
        name = BYTES if dtype.kind == "O" else dtype.name
    check_dtype(name)
    return _DTYPE_NAMES[name]


def parse_infer_request(body: bytes, header_length: int | None, limits: Limits = Limits()) -> InferBody:
    header, payload = _split(body, header_length)
    request = _load_header(header, limits.max_json_depth)
    inputs = _inputs(request.get("inputs"), payload, limits)
    parameters = _parameters(request)
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError("parameter 'binary_data_output' must be a boolean")
    requested, binary = _requested_outputs(request.get("outputs"), binary_default)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    return InferBody(request_id, inputs, requested, binary, binary_default, parameters)


def build_infer_response(
    model_name: str, model_version: str, request_id: str | None,
    outputs: dict[str, np.ndarray], body: InferBody,
) -> tuple[bytes, int | None]:
    """(response body, JSON header length or None when the body is all JSON)."""
    names = list(outputs) if body.requested_outputs is None else body.requested_outputs
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in names:
        if name not in outputs:
            raise ProtocolError(f"requested output {name!r} is not among the outputs {list(outputs)}")
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": dtype_to_datatype(array.dtype), "shape": list(array.shape)}
        strings = dtype_name(array) == BYTES
        if name in body.binary_outputs or (body.requested_outputs is None and body.binary_default):
            if strings:
                raw = serialize_bytes(array, name)
            else:
                raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif strings:
            entry["data"] = [_utf8(name, item) for item in array.reshape(-1)]
        else:
            entry["data"] = array.ravel()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = entries
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _utf8(name: str, item: bytes) -> str:
    try:
        return bytes(item).decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"output {name!r} holds bytes that are not UTF-8: request it with binary_data") from None


def caller_inputs(info: ModelInfo) -> list[TensorSignature]:
    """What a caller may send: the graph's inputs, then an image model's other forms of its image."""
    image = info.image_forms
    return [*info.inputs, *(image.forms(info.crop) if image is not None else [])]


def model_metadata(info: ModelInfo, versions: list[str]) -> dict:
    """The /v2/models/{name}[/versions/{v}] response."""

    def signature(tensor: TensorSignature) -> dict:
        return {"name": tensor.name, "datatype": dtype_to_datatype(tensor.dtype), "shape": tensor.shape}

    return {
        "name": info.name,
        "versions": versions,
        "platform": "onnxruntime_onnx",
        "inputs": [signature(t) for t in caller_inputs(info)],
        "outputs": [signature(t) for t in info.outputs],
    }


def model_config(info: ModelInfo, max_queue_delay_ms: float) -> dict:
    """The /v2/models/{name}[/versions/{v}]/config response: the version's Triton model
    configuration in Triton's JSON form, as a `config.pbtxt` for it would give (the batch axis is
    not among the dims of a model with max_batch_size > 0; -1 marks a dynamic axis).
    `max_queue_delay_ms` is how long the workers wait to fill a batch."""
    batching = info.max_batch_size > 0

    image = info.image_forms
    # An image model takes exactly one of its image's forms: each is optional to Triton.
    image_forms = {image.tensor, image.pixels, image.encoded} if image is not None else set()
    formats = {image.pixels: f"FORMAT_N{image.layout}"} if image is not None and image.pixels else {}

    def tensor(t: TensorSignature, **extra: Any) -> dict:
        dims = t.shape[1:] if batching and t.shape else t.shape
        datatype = dtype_to_datatype(t.dtype)
        return {"name": t.name, "data_type": "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}",
                "dims": dims, **extra}

    config: dict[str, Any] = {
        "name": info.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"all": {}},  # every version not retired is served
        "max_batch_size": info.max_batch_size,
        "input": [tensor(t, format=formats.get(t.name, "FORMAT_NONE"), is_shape_tensor=False,
                         allow_ragged_batch=False, optional=t.name in image_forms)
                  for t in caller_inputs(info)],
        "output": [tensor(t, label_filename=info.labels or "", is_shape_tensor=False) for t in info.outputs],
        "default_model_filename": "model.onnx",
        "parameters": {},
    }
    if batching:
        config["dynamic_batching"] = {"preferred_batch_size": [], "preserve_ordering": False,
                                      "max_queue_delay_microseconds": round(max_queue_delay_ms * 1000)}
    return config


# The Triton routes inferstream does not offer (by a part of their path): what each is, and why
# not or what to use instead.
_SHARED_MEMORY = ("inference runs in workers on other hosts than the caller; send tensors in the body (binary"
                  " tensor extension) or, when large, by S3 reference (inputs_ref)")
_UNSUPPORTED = {
    "/v2/repository/models/": (
        "model control (load/unload)", "every registered version is served by the workers; register a version"
        " with POST /v1/models and retire one with DELETE /v1/models/{model}/versions/{version}"),
    "/v2/logging": (
        "log settings", "set INFERSTREAM_LOG_LEVEL, INFERSTREAM_LOG_FORMAT and INFERSTREAM_LOG_REQUESTS on the"
        " workers and bridges"),
    "/trace/setting": (
        "trace settings", "traces follow the caller's W3C traceparent and are exported over OTLP"
        " (INFERSTREAM_OTLP_ENDPOINT)"),
    "/v2/systemsharedmemory/": ("system shared memory", _SHARED_MEMORY),
    "/v2/cudasharedmemory/": ("CUDA shared memory", _SHARED_MEMORY),
}


def unsupported_message(path: str) -> str:
    """The error message of an unsupported Triton route (its path template)."""
    what, why = next((v for part, v in _UNSUPPORTED.items() if part in path),
                     ("this Triton route", "see the README's table of Triton calls"))
    return f"{what} is not supported by inferstream: {why}"


def repository_index(infos: list[ModelInfo], served: set[str], ready_only: bool = False) -> list[dict]:
    """The POST /v2/repository/index response: every registered version, READY when a live
    worker serves it."""
    index = []
    for info in infos:
        if info.status == "retired":
            state, reason = "UNAVAILABLE", "retired"
        elif info.key in served:
            state, reason = "READY", ""
        else:
            state, reason = "UNAVAILABLE", "no live worker serves it"
        if state == "READY" or not ready_only:
            index.append({"name": info.name, "version": info.version, "state": state, "reason": reason})
    return index


@contextmanager
def _about(what: str) -> Iterator[None]:
    """Prefix protocol errors with the tensor they concern."""
    try:
        yield
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc.message}") from None


def _split(body: bytes, header_length: int | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    if not 0 <= header_length <= len(body):
        raise ProtocolError(
            f"Inference-Header-Content-Length {header_length} does not fit a {len(body)}-byte body"
        )
    # A view, so binary tensors are read without copying them.
    return body[:header_length], memoryview(body)[header_length:]


def _json_depth(text: bytes) -> int:
    """Nesting depth of a JSON text, found without parsing it, so without recursion."""
    brackets = _JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    steps = _NESTING_STEP[np.frombuffer(brackets, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def _load_header(header: bytes, max_depth: int) -> dict:
    if _json_depth(header) > max_depth:
        raise ProtocolError(f"the JSON header nests deeper than {max_depth} levels")
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the JSON header is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError("the JSON header must be an object")
    return request


def _name(spec: Any, where: str) -> str:
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{where} must be an object with a non-empty string 'name'")
    return name


def _parameters(spec: dict) -> dict:
    parameters = spec.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object")
    return parameters


def _tensor_parameters(spec: dict) -> dict:
    parameters = _parameters(spec)
    # Extensions inferstream does not implement; ignoring them would return wrong results.
    for key in ("shared_memory_region", "classification"):
        if key in parameters:
            raise ProtocolError(f"parameter {key!r} is not supported")
    return parameters


def _shape(shape: Any, max_dim: int) -> tuple[int, ...]:
    if (
        not isinstance(shape, list) or len(shape) > _MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= max_dim for d in shape)
    ):
        raise ProtocolError(f"'shape' must be a list of at most {_MAX_RANK} integers from 0 to {max_dim}")
    return tuple(shape)


def _binary_size(spec: dict) -> int | None:
    size = _tensor_parameters(spec).get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError("'binary_data_size' must be a non-negative integer")
    if "data" in spec:
        raise ProtocolError("has both 'data' and 'binary_data_size'")
    return size


def _inputs(specs: Any, payload: memoryview, limits: Limits) -> dict[str, np.ndarray]:
    if not isinstance(specs, list):
        raise ProtocolError("the request needs an 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    budget = limits.max_elements
    offset = 0  # binary tensors follow the header back to back, in input order
    for index, spec in enumerate(specs):
        name = _name(spec, f"inputs[{index}]")
        if name in inputs:
            raise ProtocolError(f"input {name!r} appears twice")
        with _about(f"input {name!r}"):
            dtype = datatype_to_dtype(spec.get("datatype"))
            shape = _shape(spec.get("shape"), limits.max_elements)
            count = math.prod(shape)
            budget -= count
            if budget < 0:
                raise ProtocolError(f"the request holds more than {limits.max_elements} tensor elements")
            size = _binary_size(spec)
            if size is None:
                array = _json_tensor(spec.get("data"), dtype, count)
            else:
                array = _binary_tensor(payload[offset:offset + size], size, dtype, count)
                offset += size
            inputs[name] = array.reshape(shape)
    if offset != len(payload):
        raise ProtocolError(f"{len(payload) - offset} bytes after the JSON header belong to no input")
    return inputs


def _requested_outputs(specs: Any, binary_default: bool) -> tuple[list[str] | None, set[str]]:
    if specs is None or specs == []:  # Triton returns every output for an absent or empty list
        return None, set()
    if not isinstance(specs, list):
        raise ProtocolError("'outputs' must be a list")
    names: list[str] = []
    binary: set[str] = set()
    for index, spec in enumerate(specs):
        name = _name(spec, f"outputs[{index}]")
        if name in names:
            raise ProtocolError(f"output {name!r} is requested twice")
        with _about(f"output {name!r}"):
            wanted = _tensor_parameters(spec).get("binary_data", binary_default)
            if not isinstance(wanted, bool):
                raise ProtocolError("'binary_data' must be a boolean")
        names.append(name)
        if wanted:
            binary.add(name)
    return names, binary


def _binary_tensor(raw: memoryview, size: int, dtype: np.dtype, count: int) -> np.ndarray:
    if dtype.kind == "O":
        return _binary_strings(raw, size, count)
    expected = count * dtype.itemsize
    if size != expected:
        raise ProtocolError(f"binary_data_size is {size} bytes but the shape needs {expected}")
    if len(raw) < size:
        raise ProtocolError("binary data runs past the end of the body")
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=count)
    if dtype.kind == "b" and array.view(np.uint8).max(initial=0) > 1:
        raise ProtocolError("BOOL bytes must be 0 or 1")
    return array.astype(dtype, copy=False)  # the wire is little-endian; a no-op on such hosts


def _binary_strings(raw: memoryview, size: int, count: int) -> np.ndarray:
    if len(raw) < size:
        raise ProtocolError("binary data runs past the end of the body")
    try:
        return deserialize_bytes(raw, count)
    except EventError as exc:
        raise ProtocolError(exc.message) from None


def _json_strings(data: list, count: int) -> np.ndarray:
    """BYTES from JSON: strings (a flat or nested list), each sent as its UTF-8 bytes."""
    flat: list[Any] = []
    pending = [data]
    while pending:  # flattened without recursion: the depth is bounded, but by the caller
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(reversed(item))
        else:
            flat.append(item)
            if len(flat) > count:
                break
    if len(flat) != count:
        found = f"more than {count}" if len(flat) > count else str(len(flat))
        raise ProtocolError(f"'data' has {found} values but the shape needs {count}")
    if not all(isinstance(item, str) for item in flat):
        raise ProtocolError("'data' must hold strings for BYTES")
    out = np.empty(count, dtype=object)
    out[:] = [item.encode() for item in flat]
    return out


def _json_tensor(data: Any, dtype: np.dtype, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError("needs a 'data' list or parameters.binary_data_size")
    if dtype.kind == "O":
        return _json_strings(data, count)
    try:
        # No dtype here: numpy would coerce strings and nulls and truncate floats to integers.
        values = np.asarray(data)
    except ValueError:
        raise ProtocolError("'data' is a ragged nested list") from None
    if values.size != count:
        raise ProtocolError(f"'data' has {values.size} values but the shape needs {count}")
    if count == 0:
        return np.empty(0, dtype=dtype)
    if values.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise ProtocolError(f"'data' must hold {_JSON_KIND_NAMES[dtype.kind]} for {_DTYPE_NAMES[dtype.name]}")
    if dtype.kind in "iu":
        bounds = np.iinfo(dtype)
        if values.min() < bounds.min or values.max() > bounds.max:
            raise ProtocolError(f"'data' values fall outside the range of {_DTYPE_NAMES[dtype.name]}")
    return values.astype(dtype)


def tensor_json(name: str, array: np.ndarray) -> dict:
    """An output tensor in the Open Inference Protocol's JSON form."""
    return {"name": name, "datatype": dtype_to_datatype(array.dtype), "shape": list(array.shape),
            "data": array.reshape(-1).tolist()}
