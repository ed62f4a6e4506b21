"""Seeded generators of hostile Kafka events for the fuzz suite.

Every event is made from a `random.Random`, so a seed reproduces the same events (up to the
timestamps in them). Each carries the name of what made it (`kind`), so that a failure report
says what kind of input was lost, and `reproducer()` gives the exact bytes.
"""

from __future__ import annotations

import base64
import json
import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from topics import events, tensors
from topics.names import Topics

Headers = list[tuple[str, bytes | None]]
Body = dict[str, Any]

# ~3.5 MB: under the 4 MiB `max_message_bytes`, so these are not refused for size alone.
LARGE_EVENT_BYTES = 3_500_000

# Values of the wrong type for any field (and some of the right type with hostile contents).
WRONG_VALUES: list[Any] = [
    None, True, False, 0, -1, 1.5, -(2**63), 2**63, 2**64, 10**30, "", "x", "1", [], [1, 2], ["x"],
    {}, {"a": 1}, {"": None}, [[[]]], "\x00", "\ud800", float("nan"), float("inf"),
]
HOSTILE_STRINGS = [
    "", "\x00", "a\x00b", "\u202eevil", "\ufeffbom", "😀" * 50, "\ud800", "\udfff\ud800", "\x1b[31mred",
    "'; DROP TABLE inference_results; --", "../../etc/passwd", "%s%s%n", "{{7*7}}", "ℌ𝔢𝔩𝔩𝔬", " ", "\n\r\t",
]
BAD_DTYPES: list[Any] = [
    "float128", "object", "<f4", "FLOAT32", "float32\x00", "str", "V8", "complex64", "", "float", "f4",
    "datetime64", "U10", None, 7, ["float32"], {"dtype": "float32"},
]
BAD_SHAPES: list[Any] = [
    [2**40, 16], [2**62, 2**62], [-1, 16], [1, -16], [0, 16], [], [16], [1, 16, 1], [1] * 64 + [16],
    [1] * 65, [2**31] * 3, [1.5, 16], ["1", "16"], [True, 16], [None], "1,16", None, 16, [[1], [16]],
    [1, 16] * 40, [10**30, 16],
]
HOSTILE_HEADER_VALUES: list[bytes | None] = [
    None, b"", b"\xff\xfe\xfd", b"\x00" * 16, b"\xc3\x28", b"garbage", b"x" * 10_000,
    "ключ😀".encode(), b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01",
]


@dataclass
class HostileEvent:
    kind: str
    value: bytes | None
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    topic: str = ""  # set by the generator; the requests topic unless said otherwise

    def carried_request_id(self) -> str | None:
        """The request id a worker can read from the bytes (its best-effort parse), if any."""
        if not self.value:
            return None
        try:
            return events.reply_address(self.value)[0]
        except Exception:  # noqa: BLE001 - hostile bytes: no readable id
            return None

    def reproducer(self, limit: int = 65_536) -> dict[str, Any]:
        """The event as JSON-able data: its bytes in base64 when small, else a prefix."""
        value = self.value
        return {
            "kind": self.kind,
            "topic": self.topic,
            "key_b64": None if self.key is None else base64.b64encode(self.key[:limit]).decode(),
            "headers": [[k, None if v is None else base64.b64encode(v[:1024]).decode()] for k, v in self.headers],
            "value_bytes": None if value is None else len(value),
            "value_b64": None if value is None else base64.b64encode(value[:limit]).decode(),
            "value_truncated": value is not None and len(value) > limit,
        }


DEEP = re.compile(rb'"@@deep:(\d+):(list|object)@@"')


def _nested_json(match: re.Match[bytes]) -> bytes:
    depth = int(match[1])
    if match[2] == b"list":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def dumps(body: Any, rng: random.Random) -> bytes:
    """JSON as any client might write it: stdlib json (big ints, NaN, lone surrogates survive)."""
    text = json.dumps(body, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    return text.encode("utf-8", errors="surrogatepass")


class HostileEvents:
    """Hostile request events (and forgeries of internal events) for one fuzz run."""

    def __init__(self, rng: random.Random, topics: Topics, reply_topic: str, foreign_refs: list[str],
                 run: str) -> None:
        self.rng = rng
        self.topics = topics
        self.reply_topic = reply_topic
        self.foreign_refs = foreign_refs  # s3:// references a caller must not be able to read
        self.run = run
        self._mutations: list[Callable[[Body, bytearray], str]] = [
            self._wrong_type, self._wrong_tensor_type, self._missing_field, self._unknown_field, self._bad_shape,
            self._bad_dtype, self._bad_layout, self._hostile_string, self._long_string, self._deep_nesting,
            self._bad_reply_to, self._foreign_ref, self._bad_deadline, self._bad_credentials,
            self._forged_lineage, self._bad_json_data, self._extra_tensors,
        ]

    # -- valid material ----------------------------------------------------------------------

    def request_id(self, index: int) -> str:
        return f"fz-{self.run}-{index}"

    def template(self, index: int, binary: bool, rows: int = 1) -> tuple[Body, bytearray]:
        """A valid tiny request (header body, tensor payload) to start from."""
        request_id = self.request_id(index)
        header = events.InferenceRequest(
            request_id=request_id, model="tiny", reply_to=self.reply_topic, correlation_id=f"c-{request_id}",
            deadline_ms=events.now_ms() + 600_000,
        )
        body = header.model_dump(exclude_none=True, exclude={"inputs"})
        x = np.random.default_rng(index).standard_normal((rows, 16), dtype=np.float32)
        if binary:
            specs, payload = tensors.pack({"x": x})
            body["inputs"] = specs
            return body, bytearray(payload)
        body["inputs"] = [tensors.to_json("x", x)]
        return body, bytearray()

    def encode(self, body: Any, payload: bytes | bytearray, binary: bool) -> bytes:
        head = DEEP.sub(_nested_json, dumps(body, self.rng))
        return events.MAGIC + struct.pack(">I", len(head)) + head + bytes(payload) if binary else head

    def valid(self, index: int, binary: bool = True) -> bytes:
        body, payload = self.template(index, binary)
        return self.encode(body, payload, binary)

    # -- the generator -----------------------------------------------------------------------

    def event(self, index: int) -> HostileEvent:
        """One hostile event for the requests topic."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.10:
            made = self._random_bytes()
        elif roll < 0.65:
            made = self._mutated(index)
        elif roll < 0.85:
            made = self._byte_mutated(index)
        else:
            made = HostileEvent("valid-body-hostile-headers", self.valid(index, rng.random() < 0.5),
                                headers=self._hostile_headers(always=True))
        if rng.random() < 0.25:
            made.headers += self._hostile_headers()
            made.kind += "+headers"
        made.key = self._key(index)
        if made.value is None and made.key is None:
            made.key = b"tombstone"  # Kafka takes no record without both
        made.topic = self.topics.requests
        return made

    def large(self, index: int) -> list[HostileEvent]:
        """A few events of about LARGE_EVENT_BYTES: garbage, a huge string, a huge tensor."""
        rng = self.rng
        garbage = HostileEvent("large-random-bytes", rng.randbytes(LARGE_EVENT_BYTES))
        body, _ = self.template(index, binary=False)
        body["correlation_id"] = "c" * LARGE_EVENT_BYTES
        huge_string = HostileEvent("large-json-correlation-id", self.encode(body, b"", binary=False))
        rows = LARGE_EVENT_BYTES // 64  # over tiny's max batch of 1024 rows
        body, payload = self.template(index + 1, binary=True, rows=rows)
        huge_tensor = HostileEvent("large-binary-tensor", self.encode(body, payload, binary=True))
        made = [garbage, huge_string, huge_tensor]
        for event in made:
            event.key = self.request_id(index).encode()
            event.topic = self.topics.requests
        return made

    def _random_bytes(self) -> HostileEvent:
        rng = self.rng
        if rng.random() < 0.05:
            return HostileEvent("tombstone", None)
        size = rng.choice([0, 1, 3, 4, 7, 8, rng.randrange(9, 64), rng.randrange(64, 4096), rng.randrange(4096, 65536)])
        prefix = rng.choice([b"", b"", events.MAGIC, b"{", b"[", b'{"request_id":', b"\xef\xbb\xbf{"])
        return HostileEvent(f"random-bytes-{size}", prefix + rng.randbytes(size))

    def _mutated(self, index: int) -> HostileEvent:
        binary = self.rng.random() < 0.5
        body, payload = self.template(index, binary)
        what = self.rng.choice(self._mutations)(body, payload)
        return HostileEvent(f"{'binary' if binary else 'json'}:{what}", self.encode(body, payload, binary))

    def _byte_mutated(self, index: int) -> HostileEvent:
        rng = self.rng
        binary = rng.random() < 0.6
        raw = bytearray(self.valid(index, binary))
        choice = rng.randrange(7)
        if choice == 0:
            cut = rng.randrange(0, len(raw))
            return HostileEvent(f"truncated-{'binary' if binary else 'json'}-at-{cut}", bytes(raw[:cut]))
        if choice == 1 and binary:
            size = struct.unpack_from(">I", raw, 4)[0]
            lie = rng.choice([size + 1, size + rng.randrange(2, 1 << 20), 0xFFFFFFFF, 0, size - 1, len(raw)])
            struct.pack_into(">I", raw, 4, lie % (1 << 32))
            return HostileEvent(f"frame-length-{lie}", bytes(raw))
        if choice == 2:
            flips = rng.randrange(1, 9)
            for _ in range(flips):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            return HostileEvent(f"flipped-{flips}-bits", bytes(raw))
        if choice == 3:
            at = rng.randrange(len(raw))
            raw[at:at] = rng.randbytes(rng.randrange(1, 32))
            return HostileEvent("inserted-bytes", bytes(raw))
        if choice == 4:
            text = bytes(raw)
            marker = self.request_id(index).encode()
            return HostileEvent("invalid-utf8-in-header", text.replace(marker, marker[:3] + b"\xff\xfe" + marker[3:]))
        if choice == 5:
            wrapped = bytes(raw) if not binary else bytes(raw[8:])
            return HostileEvent("magic-mismatch", (events.MAGIC + wrapped) if not binary else wrapped)
        return HostileEvent("double-framed", events.MAGIC + struct.pack(">I", len(raw)) + bytes(raw))

    # -- structural mutations (each returns what it did) -------------------------------------

    def _wrong_type(self, body: Body, payload: bytearray) -> str:
        name = self.rng.choice(sorted(events.InferenceRequest.model_fields))
        body[name] = self.rng.choice(WRONG_VALUES)
        return f"wrong-type:{name}={body[name]!r:.40}"

    def _wrong_tensor_type(self, body: Body, payload: bytearray) -> str:
        spec = body["inputs"][0]
        name = self.rng.choice(["name", "dtype", "shape", "offset", "nbytes", "data"])
        spec[name] = self.rng.choice(WRONG_VALUES)
        return f"wrong-tensor-type:{name}"

    def _missing_field(self, body: Body, payload: bytearray) -> str:
        name = self.rng.choice(["request_id", "model", "inputs", "schema_version", "reply_to"])
        if self.rng.random() < 0.3:
            spec = body["inputs"][0]
            name = self.rng.choice(sorted(spec))
            del spec[name]
            return f"missing-tensor-field:{name}"
        body.pop(name, None)
        return f"missing:{name}"

    def _unknown_field(self, body: Body, payload: bytearray) -> str:
        where = self.rng.choice(["top", "tensor", "credentials", "replay_of"])
        name = self.rng.choice(["__proto__", "constructor", "x", "\x00", "inputs_ref2"])
        extra = {name: self.rng.choice(WRONG_VALUES)}
        if where == "top":
            body.update(extra)
        elif where == "tensor":
            body["inputs"][0].update(extra)
        elif where == "credentials":
            body["credentials"] = {"authorization": None, "api_key": None, **extra}
        else:
            body["replay_of"] = {"topic": "t", "partition": 0, "offset": 0, "request_id": "r", **extra}
        return f"unknown-field:{where}"

    def _bad_shape(self, body: Body, payload: bytearray) -> str:
        spec = body["inputs"][0]
        shape = self.rng.choice(BAD_SHAPES)
        spec["shape"] = shape
        if "nbytes" in spec and self.rng.random() < 0.5 and isinstance(shape, list):
            # Keep nbytes consistent where possible, so the shape itself is what is tested.
            try:
                count = int(np.prod([int(d) for d in shape], dtype=object))
                spec["nbytes"] = count * 4
            except (TypeError, ValueError):
                pass
        return f"shape:{str(shape)[:60]}"

    def _bad_dtype(self, body: Body, payload: bytearray) -> str:
        dtype = self.rng.choice(BAD_DTYPES + ["float64", "int32", "uint8", "bool", "float16"])
        body["inputs"][0]["dtype"] = dtype
        return f"dtype:{dtype!r}"

    def _bad_layout(self, body: Body, payload: bytearray) -> str:
        spec = body["inputs"][0]
        if "nbytes" not in spec:  # JSON form: the data list instead
            spec["data"] = spec["data"][: self.rng.randrange(0, 16)] or spec["data"] * 2
            return "json-data-length"
        choice = self.rng.choice(["nbytes+1", "nbytes-1", "nbytes=0", "offset=end", "offset=-8", "offset=2**63",
                                  "offset=3", "duplicate", "payload-short", "payload-empty", "overlap"])
        if choice == "nbytes+1":
            spec["nbytes"] += 1
        elif choice == "nbytes-1":
            spec["nbytes"] -= 1
        elif choice == "nbytes=0":
            spec["nbytes"] = 0
        elif choice == "offset=end":
            spec["offset"] = len(payload)
        elif choice == "offset=-8":
            spec["offset"] = -8
        elif choice == "offset=2**63":
            spec["offset"] = 2**63
        elif choice == "offset=3":
            payload[0:0] = b"\0\0\0"
            spec["offset"] = 3
        elif choice == "duplicate":
            body["inputs"].append(dict(spec))
        elif choice == "payload-short":
            del payload[-self.rng.randrange(1, len(payload)):]
        elif choice == "payload-empty":
            payload.clear()
        else:
            body["inputs"].append({**spec, "name": "x2"})
        return f"layout:{choice}"

    def _hostile_string(self, body: Body, payload: bytearray) -> str:
        name = self.rng.choice(["request_id", "model", "version", "correlation_id", "tenant", "reply_to", "batch_id"])
        value = self.rng.choice(HOSTILE_STRINGS)
        body[name] = value if name != "request_id" else f"{body['request_id']}{value}"
        if self.rng.random() < 0.3:
            body["inputs"][0]["name"] = value
            return f"hostile-string:{name}+tensor-name"
        return f"hostile-string:{name}"

    def _long_string(self, body: Body, payload: bytearray) -> str:
        name = self.rng.choice(["request_id", "model", "version", "correlation_id", "tenant", "reply_to",
                                "inputs_ref", "parameters"])
        size = self.rng.choice([129, 201, 1000, 10_000, 10_000, 100_000 if self.rng.random() < 0.2 else 129])
        value = self.rng.choice("aZ0.-_é😀\x00") * size
        if name == "parameters":
            body["parameters"] = {value: value}
        elif name == "request_id":
            body[name] = body["request_id"] + value
        else:
            body[name] = value
        return f"long-string:{name}:{size}"

    def _deep_nesting(self, body: Body, payload: bytearray) -> str:
        depth = self.rng.choice([64, 100, 500, 1000, 1023, 1025, 2000, 20_000])
        # Spliced in by `encode` as text: the stdlib encoder would overflow Python's stack.
        nested = f"@@deep:{depth}:{'list' if self.rng.random() < 0.5 else 'object'}@@"
        where = self.rng.choice(["parameters", "data", "credentials", "shape"])
        if where == "parameters":
            body["parameters"] = {"deep": nested}
        elif where == "data":
            body["inputs"][0]["data"] = nested
        elif where == "credentials":
            body["credentials"] = {"authorization": nested}
        else:
            body["inputs"][0]["shape"] = nested
        return f"deep-nesting:{where}:{depth}"

    def _bad_reply_to(self, body: Body, payload: bytearray) -> str:
        t = self.topics
        body["reply_to"] = self.rng.choice([
            t.requests, t.results, t.deadletter, t.batches, t.registry, t.model("tiny"), t.model("resnet18"),
            f"nonexistent-{self.run}-{self.rng.randrange(1 << 30)}", "", " ", "a b", "../x", "x" * 300, "\x00",
            "é", "__consumer_offsets", f"{t.replies}.bridge.someone-else",
        ])
        return f"reply-to:{body['reply_to'][:60]!r}"

    def _foreign_ref(self, body: Body, payload: bytearray) -> str:
        ref = self.rng.choice([*self.foreign_refs, "s3://", "s3:///x", "s3://b", "http://127.0.0.1/x",
                               "file:///etc/passwd", "s3://bucket/../../x", "s3://%00/x", "s3://" + "b" * 5000 + "/k"])
        body["inputs_ref"] = ref
        if self.rng.random() < 0.7:
            body["inputs"] = []
            payload.clear()
        return f"inputs-ref:{ref[:80]}"

    def _bad_deadline(self, body: Body, payload: bytearray) -> str:
        field_name = self.rng.choice(["deadline_ms", "created_ms"])
        body[field_name] = self.rng.choice([-1, 0, 1, 2**63 - 1, 2**63, 2**64, -(2**63), 1.0e300, "soon",
                                            events.now_ms() - 1])
        return f"time:{field_name}={body[field_name]!r}"

    def _bad_credentials(self, body: Body, payload: bytearray) -> str:
        body["credentials"] = self.rng.choice([
            {"authorization": "Bearer "}, {"authorization": "Bearer a.b.c"}, {"authorization": "Basic Zm9vOmJhcg=="},
            {"authorization": "Bearer " + "A" * 100_000}, {"api_key": "isk_x_y"}, {"api_key": "isk_\x00_\x00"},
            {"api_key": "'; DROP TABLE api_keys; --"},
            {"authorization": "Bearer eyJhbGciOiJub25lIn0.eyJ0ZW5hbnQiOiJ2aWN0aW0iLCJzY29wZSI6ImluZmVyIn0."},
            {"api_key": ""}, {"authorization": ""},
        ])
        return f"credentials:{str(body['credentials'])[:60]}"

    def _forged_lineage(self, body: Body, payload: bytearray) -> str:
        name = self.rng.choice(["shadow_of", "batch_id", "replay_of", "tenant"])
        body[name] = (
            {"topic": self.topics.requests, "partition": 0, "offset": 0, "request_id": "victim"}
            if name == "replay_of" else "victim"
        )
        return f"forged:{name}"

    def _bad_json_data(self, body: Body, payload: bytearray) -> str:
        spec = body["inputs"][0]
        spec.pop("offset", None)
        spec.pop("nbytes", None)
        payload.clear()
        spec["data"] = self.rng.choice([
            ["x"] * 16, [[1.0] * 8, [1.0] * 9], [None] * 16, [True] * 16, [float("inf")] * 16,
            [float("nan")] * 16, [1e400] * 16, [2**70] * 16, [{"a": 1}] * 16, [[[]]] * 16, [], "0" * 16,
            [1.0] * 20_000,
        ])
        return f"json-data:{str(spec['data'])[:40]}"

    def _extra_tensors(self, body: Body, payload: bytearray) -> str:
        count = self.rng.choice([2, 3, 50, 300])
        spec = body["inputs"][0]
        body["inputs"] = [{**spec, "name": f"t{i}"} for i in range(count)]
        return f"extra-tensors:{count}"

    # -- Kafka keys and headers --------------------------------------------------------------

    def _key(self, index: int) -> bytes | None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            return self.request_id(index).encode()
        return rng.choice([None, b"", rng.randbytes(rng.randrange(1, 64)), b"\xff\xfe", b"k" * 10_000])

    def _hostile_headers(self, always: bool = False) -> Headers:
        rng = self.rng
        made: Headers = []
        for _ in range(rng.randrange(1 if always else 0, 4)):
            name = rng.choice(["traceparent", "tracestate", "inferstream-tenant", "inferstream-version",
                               "inferstream-seal", "request_id", "correlation_id", "k\x00", "ключ", "", "x" * 1000])
            if name == "inferstream-tenant":
                value: bytes | None = f"forged-{self.run}".encode()
            elif name == "inferstream-version":
                value = rng.choice([b"999", b"1", None, b"\xff", b"../1"])
            else:
                value = rng.choice(HOSTILE_HEADER_VALUES)
            made.append((name, value))
        if rng.random() < 0.02:
            made += [(f"h{i}", b"v") for i in range(500)]
        return made


@dataclass
class Probe:
    """An event with one exact expectation, beyond being answered or dead-lettered:
    - "ok": a valid request with hostile Kafka headers, served as if they were absent;
    - "refused": a request naming an object callers may not read, never served ok;
    - "unauthenticated": an outsider's event on an internal topic, dead-lettered as
      UNAUTHENTICATED and never served."""

    event: HostileEvent
    request_id: str | None
    expect: str


INTERNAL_FORGERIES = (
    "outsider-model-topic", "outsider-model-topic-forged-headers", "outsider-results-topic",
    "outsider-batches-topic", "outsider-batches-topic-garbage",
)


def forged_tenant(run: str) -> str:
    return f"forged-{run}"


class Probes:
    """The probes of one fuzz run, made from the same valid material as the hostile events."""

    def __init__(self, made: HostileEvents) -> None:
        self.made = made
        self.topics = made.topics

    def all(self, first_index: int, copies: int) -> list[Probe]:
        index = first_index
        probes: list[Probe] = []
        header_cases: list[tuple[str, Headers]] = [
            ("forged-tenant-header", [("inferstream-tenant", forged_tenant(self.made.run).encode())]),
            ("forged-version-header", [("inferstream-version", b"999")]),
            ("forged-seal-header", [("inferstream-seal", b"AAAA.00")]),
            ("null-traceparent", [("traceparent", None)]),
            ("garbage-traceparent", [("traceparent", b"\xff\xfe-not-a-trace")]),
            ("null-header", [("x-anything", None)]),
            ("non-utf8-header", [("x-anything", b"\xff\xfe\xfd")]),
        ]
        for copy in range(copies):
            for kind, headers in header_cases:
                value = self.made.valid(index, binary=copy % 2 == 0)
                probes.append(self._probe(kind, self.topics.requests, index, value, "ok", headers))
                index += 1
            for ref in self.made.foreign_refs:
                body, _ = self.made.template(index, binary=False)
                body["inputs"], body["inputs_ref"] = [], ref
                value = self.made.encode(body, b"", binary=False)
                probes.append(self._probe(f"foreign-ref:{ref}", self.topics.requests, index, value, "refused"))
                index += 1
            for kind in INTERNAL_FORGERIES:
                topic, value, headers = self._internal(kind, index)
                probes.append(self._probe(kind, topic, index, value, "unauthenticated", headers))
                index += 1
        return probes

    def _internal(self, kind: str, index: int) -> tuple[str, bytes, Headers]:
        """An event an outsider writes straight to an internal topic."""
        request_id = self.made.request_id(index)
        if kind == "outsider-model-topic":
            return self.topics.model("tiny"), self.made.valid(index), []
        if kind == "outsider-model-topic-forged-headers":
            forged: Headers = [("inferstream-version", b"1"), ("inferstream-tenant", b"victim"),
                               ("inferstream-seal", b"AAAA.00")]
            return self.topics.model("tiny"), self.made.valid(index), forged
        if kind == "outsider-results-topic":
            result = events.InferenceResult(request_id=request_id, correlation_id=f"c-{request_id}", model="tiny",
                                            model_version="1", status=events.Status.OK)
            return self.topics.results, events.encode_result(result, {"y": np.zeros((1, 16), np.float32)}), []
        if kind == "outsider-batches-topic":
            return self.topics.batches, b'{"batch_id": "' + request_id.encode() + b'"}', []
        return self.topics.batches, b"\xff garbage", []

    def _probe(self, kind: str, topic: str, index: int, value: bytes, expect: str,
               headers: Headers | None = None) -> Probe:
        request_id = self.made.request_id(index)
        event = HostileEvent(f"probe:{kind}", value, request_id.encode(), list(headers or []), topic)
        return Probe(event, request_id if topic != self.topics.batches else None, expect)
