"""Tensor encoding.

Binary form: tensors are laid out back to back (each 8-byte aligned) after a JSON header that
lists `{name, dtype, shape, offset, nbytes}`; decoding is zero-copy (`np.frombuffer`).
JSON form: `{name, dtype, shape, data}` with `data` a (nested or flat) list, for small tensors
from clients that cannot build binary payloads.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from topics.errors import ErrorCode, EventError

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64",
    )
}
_ALIGN = 8
MAX_DIMS = 32  # numpy allows 64; no model input has more than a handful


def _invalid(message: str) -> EventError:
    return EventError(ErrorCode.INVALID_TENSOR, message)


def check_dtype(name: Any) -> np.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise _invalid(f"unsupported dtype {str(name)[:40]!r}; use one of {sorted(DTYPES)}") from None


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
        array = np.ascontiguousarray(array)
        if array.dtype.name not in DTYPES:
            raise _invalid(f"tensor {name!r}: unsupported dtype {array.dtype.name}")
        data = array.tobytes()
        descriptors.append(
            {"name": name, "dtype": array.dtype.name, "shape": list(array.shape),
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
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"tensor {name!r}: data is not a list of {dtype.name} values ({exc})") from None
    if array.size != math.prod(shape):
        raise _invalid(f"tensor {name!r}: {array.size} values do not fit shape {list(shape)}")
    return array.reshape(shape)


def to_json(name: str, array: np.ndarray) -> dict[str, Any]:
    return {"name": name, "dtype": array.dtype.name, "shape": list(array.shape),
            "data": array.reshape(-1).tolist()}
