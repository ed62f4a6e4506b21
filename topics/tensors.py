"""Tensor encoding.

Binary form: tensors are laid out back to back (each 8-byte aligned) after a JSON header that
lists `{name, dtype, shape, offset, nbytes}`; decoding is zero-copy (`np.frombuffer`).
JSON form: `{name, dtype, shape, data}` with `data` a (nested or flat) list, for small tensors
from clients that cannot build binary payloads.

dtype `bytes`: a tensor of byte strings of any length (an encoded image per element), held as a
numpy object array of `bytes`. Binary form: each element as a 4-byte little-endian length and
its bytes, back to back (Triton's serialization of BYTES tensors); JSON form: base64 strings.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Any

import numpy as np

from topics.errors import ErrorCode, EventError

BYTES = "bytes"
DTYPES: dict[str, np.dtype] = {
    **{
        name: np.dtype(name)
        for name in (
            "bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64",
        )
    },
    BYTES: np.dtype(object),
}
_ALIGN = 8
_LENGTH = struct.Struct("<I")  # the length before each element of a bytes tensor
MAX_DIMS = 32  # numpy allows 64; no model input has more than a handful


def _invalid(message: str) -> EventError:
    return EventError(ErrorCode.INVALID_TENSOR, message)


def check_dtype(name: Any) -> np.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise _invalid(f"unsupported dtype {str(name)[:40]!r}; use one of {sorted(DTYPES)}") from None


def dtype_name(array: np.ndarray) -> str:
    """The tensor's dtype as the codec names it (`bytes` for an object array)."""
    return BYTES if array.dtype.kind == "O" else array.dtype.name


def serialize_bytes(array: np.ndarray, name: str = "") -> bytes:
    """A bytes tensor's elements (C order), each as a 4-byte little-endian length and its bytes."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise _invalid(f"{_where(name)}a bytes tensor holds bytes, got {type(item).__name__}")
        data = bytes(item)
        parts += (_LENGTH.pack(len(data)), data)
    return b"".join(parts)


def deserialize_bytes(raw: memoryview | bytes, count: int, name: str = "") -> np.ndarray:
    """Inverse of `serialize_bytes`: exactly `count` elements filling `raw`, as a 1-D object array."""
    raw, where = memoryview(raw), _where(name)
    if count * _LENGTH.size > len(raw):  # before allocating: every element takes 4 bytes at least
        raise _invalid(f"{where}{len(raw)} bytes cannot hold {count} elements")
    out = np.empty(count, dtype=object)
    position = 0
    for i in range(count):
        if position + _LENGTH.size > len(raw):
            raise _invalid(f"{where}element {i} runs past the end of its data")
        (size,) = _LENGTH.unpack_from(raw, position)
        position += _LENGTH.size
        if position + size > len(raw):
            raise _invalid(f"{where}element {i} runs past the end of its data")
        out[i] = bytes(raw[position:position + size])
        position += size
    if position != len(raw):
        raise _invalid(f"{where}{len(raw) - position} bytes after its last element")
    return out


def _where(name: str) -> str:
    return f"tensor {name!r}: " if name else ""


def check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _invalid(f"shape must be a list of non-negative integers, got {str(shape)[:200]}")
    if len(shape) > MAX_DIMS:
        raise _invalid(f"shape has {len(shape)} dimensions, at most {MAX_DIMS} are allowed")
    return tuple(shape)


def pack(tensors: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], bytes]:
    """Lay tensors out for the binary form: (descriptors, payload)."""
    descriptors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        dtype = dtype_name(array)
        if dtype not in DTYPES:
            raise _invalid(f"tensor {name!r}: unsupported dtype {dtype}")
        data = serialize_bytes(array, name) if dtype == BYTES else np.ascontiguousarray(array).tobytes()
        descriptors.append(
            {"name": name, "dtype": dtype, "shape": list(array.shape),
             "offset": offset, "nbytes": len(data)}
        )
        chunks.append(data)
        pad = -len(data) % _ALIGN
        if pad:
            chunks.append(b"\0" * pad)
        offset += len(data) + pad
    return descriptors, b"".join(chunks)


def unpack(descriptors: list[dict[str, Any]], payload: memoryview | bytes) -> dict[str, np.ndarray]:
    """Inverse of `pack`; validates every descriptor against the payload."""
    tensors: dict[str, np.ndarray] = {}
    size = len(payload)
    for spec in descriptors:
        name = spec.get("name")
        if not isinstance(name, str):
            raise _invalid(f"tensor name must be a string, got {name!r}")
        dtype = check_dtype(spec.get("dtype"))
        shape = check_shape(spec.get("shape"))
        offset, nbytes = spec.get("offset"), spec.get("nbytes")
        if not isinstance(offset, int) or not isinstance(nbytes, int) or offset < 0 or nbytes < 0:
            raise _invalid(f"tensor {name!r}: offset and nbytes must be non-negative integers")
        if dtype.kind != "O":
            expected = math.prod(shape) * dtype.itemsize
            if nbytes != expected:
                raise _invalid(
                    f"tensor {name!r}: {nbytes} bytes do not fit shape {list(shape)} of {dtype.name}"
                    f" ({expected} bytes expected)"
                )
        if offset + nbytes > size:
            raise _invalid(f"tensor {name!r}: data runs past the end of the payload")
        if name in tensors:
            raise _invalid(f"tensor {name!r} appears twice")
        if dtype.kind == "O":
            raw = memoryview(payload)[offset:offset + nbytes]
            tensors[name] = deserialize_bytes(raw, math.prod(shape), name).reshape(shape)
            continue
        tensors[name] = np.frombuffer(payload, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
    return tensors


def from_json(spec: dict[str, Any]) -> np.ndarray:
    """A tensor given as `{name, dtype, shape, data}`."""
    name = spec.get("name")
    dtype = check_dtype(spec.get("dtype"))
    shape = check_shape(spec.get("shape"))
    data = spec.get("data")
    if data is None:
        raise _invalid(f"tensor {name!r}: JSON tensors need a 'data' list")
    if dtype.kind == "O":
        return _bytes_from_json(name, data, shape)
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"tensor {name!r}: data is not a list of {dtype.name} values ({exc})") from None
    if array.size != math.prod(shape):
        raise _invalid(f"tensor {name!r}: {array.size} values do not fit shape {list(shape)}")
    return array.reshape(shape)


def _bytes_from_json(name: Any, data: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A bytes tensor from its JSON form: a flat list of base64 strings."""
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise _invalid(f"tensor {name!r}: a bytes tensor's JSON 'data' is a flat list of base64 strings")
    if len(data) != math.prod(shape):
        raise _invalid(f"tensor {name!r}: {len(data)} values do not fit shape {list(shape)}")
    out = np.empty(len(data), dtype=object)
    try:
        for i, item in enumerate(data):
            out[i] = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"tensor {name!r}: element {i} is not base64") from None
    return out.reshape(shape)


def to_json(name: str, array: np.ndarray) -> dict[str, Any]:
    if array.dtype.kind == "O":
        serialize_bytes(array, name)  # refuses elements that are not bytes
        data = [base64.b64encode(bytes(item)).decode() for item in array.reshape(-1)]
        return {"name": name, "dtype": BYTES, "shape": list(array.shape), "data": data}
    return {"name": name, "dtype": array.dtype.name, "shape": list(array.shape),
            "data": array.reshape(-1).tolist()}
