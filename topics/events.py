"""Versioned event schemas and their wire encodings.

Every event is either
- binary: b"ISV1" | uint32 big-endian header length | JSON header | tensor payload
  (tensor descriptors in the header carry offsets into the payload), or
- JSON: the header alone, with tensors inline as `data` lists (small tensors only).
Request and result events share the framing; consumers detect the form by the first byte.
Payloads over the claim-check limit travel as an S3 reference (`inputs_ref`/`outputs_ref`) to a
tensor bundle: the same framing whose header is `{"tensors": [...]}`.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

import numpy as np
import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from topics import tensors as tensor_codec
from topics.errors import ErrorCode, EventError
from topics.tensors import MAX_DIMS

MAGIC = b"ISV1"
_LEN = struct.Struct(">I")
SCHEMA_VERSION: Final = 1
CONTENT_TYPE_BINARY = "application/vnd.inferstream.v1+binary"
CONTENT_TYPE_JSON = "application/json"


# Unix milliseconds the stores can hold (years 1970-9999).
MAX_EPOCH_MS: Final = 253_402_300_799_999


def _printable(text: str) -> str:
    """Refuse control characters: PostgreSQL cannot store NUL, and none belongs in an id or name."""
    if not text.isprintable():
        raise ValueError("must not contain control characters")
    return text


# Caller-supplied strings: bounded and printable.
_Printable = AfterValidator(_printable)
Id = Annotated[str, Field(min_length=1, max_length=128), _Printable]
Name = Annotated[str, Field(min_length=1, max_length=256), _Printable]
Label = Annotated[str, Field(max_length=256), _Printable]
TopicName = Annotated[str, Field(max_length=249), _Printable]
Uri = Annotated[str, Field(max_length=1024), _Printable]
Secret = Annotated[str, Field(max_length=8192), _Printable]
EpochMs = Annotated[int, Field(ge=0, le=MAX_EPOCH_MS)]


def now_ms() -> int:
    return int(time.time() * 1000)


def new_request_id() -> str:
    return uuid.uuid4().hex


class Credentials(BaseModel):
    """Carried unchanged from the caller to the auth stage."""

    model_config = ConfigDict(extra="forbid")
    authorization: Secret | None = None  # "Bearer <jwt>"
    api_key: Secret | None = None


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    dtype: Label  # checked against the supported dtypes where the tensor is decoded
    shape: list[int] = Field(max_length=MAX_DIMS)
    offset: int | None = None  # binary form
    nbytes: int | None = None  # binary form
    data: list[Any] | None = None  # JSON form


class ReplayOrigin(BaseModel):
    """Where a replayed request came from (set by `inferstream replay`)."""

    model_config = ConfigDict(extra="forbid")
    topic: TopicName
    partition: int = Field(ge=0, le=2**31 - 1)
    offset: int = Field(ge=0, le=2**63 - 1)
    request_id: Id


class InferenceRequest(BaseModel):
    """Header of a request event (topic `<prefix>.requests`, key = request key)."""

    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION
    # Required: every stage must agree on it, and a redelivered event keeps it.
    request_id: Id
    model: Name
    version: Label | None = None
    inputs: list[TensorSpec] = Field(default_factory=list)
    inputs_ref: Uri | None = None  # s3://bucket/key of a tensor bundle
    # Topic for the result; the default replies topic when unset. Its length and name are checked
    # against the topic rules at admission (INVALID_REPLY_TO).
    reply_to: Annotated[str, _Printable] | None = None
    correlation_id: Label | None = None
    deadline_ms: EpochMs | None = None
    tenant: Label | None = None
    credentials: Credentials | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    batch_id: Id | None = None  # set on the items of a batch job
    shadow_of: Id | None = None  # set on a shadow copy: the request id it mirrors
    replay_of: ReplayOrigin | None = None  # set on a replayed copy: never answered to a caller
    created_ms: EpochMs = Field(default_factory=now_ms)


class Status(StrEnum):
    OK = "ok"
    ERROR = "error"


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str


class InferenceResult(BaseModel):
    """Header of a result event (reply topic and `<prefix>.results`, key = request id)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str
    correlation_id: str | None = None
    model: str | None = None
    model_version: str | None = None
    status: Status
    outputs: list[TensorSpec] = Field(default_factory=list)
    outputs_ref: str | None = None
    error: ErrorInfo | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    batch_size: int | None = None
    backend: str | None = None  # which backend served it
    tenant: str | None = None
    batch_id: str | None = None
    shadow_of: str | None = None
    created_ms: int | None = None
    completed_ms: int = Field(default_factory=now_ms)


class DeadLetter(BaseModel):
    """An event that could not be served (topic `<prefix>.deadletter`).

    The original travels inline (`original_b64`) when small, else as an S3 reference
    (`original_ref`), so that a dead letter always fits in a Kafka message; a letter with neither
    did not keep it (it stays in its source topic until retention removes it). Letters written
    before references existed carry `original_b64` only, and still decode.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    reason: ErrorCode
    message: str
    source_topic: str
    source_partition: int
    source_offset: int
    request_id: str | None = None
    original_b64: str | None = None  # the original event bytes (redacted), inline
    original_ref: str | None = None  # or s3://bucket/key of them
    original_bytes: int | None = None  # size of the stored original
    redacted: bool = False  # credentials were removed from the original or its Kafka headers
    headers_dropped: int = 0  # the original's Kafka headers left out for size
    key_dropped: bool = False  # the original's Kafka key left out for size
    failed_ms: int = Field(default_factory=now_ms)

    @model_validator(mode="after")
    def _one_original(self) -> DeadLetter:
        if self.original_b64 is not None and self.original_ref is not None:
            raise ValueError("a dead letter carries original_b64 or original_ref, not both")
        return self

    @property
    def original(self) -> bytes:
        """The inline original; raises ValueError when it is in S3 (`original_ref`) or not kept."""
        if self.original_b64 is None:
            raise ValueError(f"the original is stored at {self.original_ref}" if self.original_ref
                             else "the original was not kept")
        return base64.b64decode(self.original_b64)


@dataclass
class Request:
    header: InferenceRequest
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Result:
    header: InferenceResult
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


# -- framing -------------------------------------------------------------------------------


def frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = orjson.dumps(header)
    return b"".join((MAGIC, _LEN.pack(len(head)), head, payload))


def unframe(raw: bytes) -> tuple[dict[str, Any], memoryview]:
    """(header, payload) of a binary or JSON event; raises EventError(UNDECODABLE)."""
    if raw[:4] == MAGIC:
        if len(raw) < 8:
            raise EventError(ErrorCode.UNDECODABLE, "binary event shorter than its frame header")
        (size,) = _LEN.unpack_from(raw, 4)
        if 8 + size > len(raw):
            raise EventError(ErrorCode.UNDECODABLE, "binary event header runs past the end")
        head, payload = raw[8 : 8 + size], memoryview(raw)[8 + size :]
    else:
        head, payload = raw, memoryview(b"")
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise EventError(ErrorCode.UNDECODABLE, f"not a binary or JSON event: {exc}") from None
    if not isinstance(header, dict):
        raise EventError(ErrorCode.UNDECODABLE, "event must be a JSON object")
    return header, payload


def _tensors(specs: list[TensorSpec], payload: memoryview) -> dict[str, np.ndarray]:
    binary = [s.model_dump(exclude={"data"}) for s in specs if s.data is None]
    tensors = tensor_codec.unpack(binary, payload)
    for spec in specs:
        if spec.data is not None:
            if spec.name in tensors:
                raise EventError(ErrorCode.INVALID_TENSOR, f"tensor {spec.name!r} appears twice")
            tensors[spec.name] = tensor_codec.from_json(spec.model_dump())
    return tensors


def _header_specs(tensors: dict[str, np.ndarray], binary: bool) -> tuple[list[dict], bytes]:
    if binary:
        return tensor_codec.pack(tensors)
    return [tensor_codec.to_json(n, a) for n, a in tensors.items()], b""


def problems(exc: ValidationError, most: int = 5) -> str:
    """What a validation found, field by field, without quoting the input (pydantic's own text
    repeats it)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:most])


def _validate(model: type[BaseModel], header: dict[str, Any]) -> Any:
    try:
        return model.model_validate(header)
    except ValidationError as exc:
        raise EventError(ErrorCode.INVALID_SCHEMA, problems(exc)) from None


# -- requests ------------------------------------------------------------------------------


def encode_request(header: InferenceRequest, tensors: dict[str, np.ndarray], binary: bool = True) -> bytes:
    specs, payload = _header_specs(tensors, binary)
    body = header.model_dump(exclude_none=True, exclude={"inputs"})
    body["inputs"] = specs
    return frame(body, payload) if binary else orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_request_header(raw: bytes) -> tuple[InferenceRequest, memoryview]:
    header, payload = unframe(raw)
    return _validate(InferenceRequest, header), payload


def decode_request(raw: bytes) -> Request:
    header, payload = decode_request_header(raw)
    return Request(header, _tensors(header.inputs, payload))


def reply_address(raw: bytes) -> tuple[str | None, str | None, str | None]:
    """Best-effort (request_id, reply_to, correlation_id) of an event that failed validation, so
    its caller can still get an error reply."""
    try:
        header, _ = unframe(raw)
    except EventError:
        return None, None, None
    return _valid_or_none(_ID, header.get("request_id")), _valid_or_none(_TOPIC, header.get("reply_to")), \
        _valid_or_none(_LABEL, header.get("correlation_id"))


_ID, _TOPIC, _LABEL = TypeAdapter(Id), TypeAdapter(TopicName), TypeAdapter(Label)


def _valid_or_none(adapter: TypeAdapter[str], value: Any) -> str | None:
    try:
        return adapter.validate_python(value, strict=True) or None
    except ValidationError:
        return None


def without_credentials(raw: bytes) -> bytes:
    """A request event as the product passes it on: its `credentials` removed, tensors untouched
    (the payload is not re-packed). Events without credentials come back unchanged."""
    header, payload = unframe(raw)
    if "credentials" not in header:
        return raw
    del header["credentials"]
    if raw[:4] == MAGIC:
        return frame(header, bytes(payload))
    return orjson.dumps(header)


# -- results -------------------------------------------------------------------------------


def encode_result(header: InferenceResult, tensors: dict[str, np.ndarray] | None = None) -> bytes:
    specs, payload = tensor_codec.pack(tensors or {})
    body = header.model_dump(mode="json", exclude_none=True, exclude={"outputs"})
    body["outputs"] = specs
    return frame(body, payload)


def decode_result(raw: bytes) -> Result:
    header, payload = unframe(raw)
    result = _validate(InferenceResult, header)
    return Result(result, _tensors(result.outputs, payload))


def decode_result_to_store(raw: bytes) -> tuple[InferenceResult, bytes | None]:
    """A result's header and its outputs as a tensor bundle, for storing: the payload bytes
    are kept as they are, not unpacked and packed again."""
    header, payload = unframe(raw)
    result = _validate(InferenceResult, header)
    if not result.outputs:
        return result, None
    return result, frame({"tensors": header["outputs"]}, bytes(payload))


# -- tensor bundles (claim check) ----------------------------------------------------------


def encode_bundle(tensors: dict[str, np.ndarray]) -> bytes:
    specs, payload = tensor_codec.pack(tensors)
    return frame({"tensors": specs}, payload)


def decode_bundle(raw: bytes) -> tuple[list[TensorSpec], dict[str, np.ndarray]]:
    header, payload = unframe(raw)
    specs = [_validate(TensorSpec, s) for s in header.get("tensors") or []]
    return specs, _tensors(specs, payload)


# -- dead letters --------------------------------------------------------------------------


def encode_dead_letter(letter: DeadLetter) -> bytes:
    return orjson.dumps(letter.model_dump(mode="json"))


def decode_dead_letter(raw: bytes) -> DeadLetter:
    """Raises pydantic's ValidationError for anything that is not a dead letter."""
    return DeadLetter.model_validate_json(raw)


def redact_credentials(raw: bytes) -> tuple[bytes, bool]:
    """The event without the `credentials` of its header, and whether there were any. The payload
    bytes are kept as they are; bytes that do not unframe as an event are returned unchanged (no
    stage reads credentials from them either)."""
    try:
        header, payload = unframe(raw)
    except EventError:
        return raw, False
    if header.pop("credentials", None) is None:
        return raw, False
    return (frame(header, bytes(payload)) if raw[:4] == MAGIC else orjson.dumps(header)), True
