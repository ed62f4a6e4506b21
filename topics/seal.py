"""Seals on internal events: proof that an event on an internal topic was written by the product.

Callers write only the requests topic. Whatever the product writes to its internal topics (model
topics, results, batch commands, registry records) carries one `inferstream-seal` header: the
claims the writer vouches for (for a request: its id, tenant, scopes, model and routed version)
and an HMAC-SHA256, under the cluster secret, over the topic, the key, the claims and the value.
A consumer of an internal topic serves an event only when its seal opens, and takes tenant and
version from the claims, never from the event's body or other headers. A sealed event copied to
another topic, or with a changed key, body or claim, does not open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from typing import Any

import orjson

SEAL_HEADER = "inferstream-seal"
# Headers in this namespace are the product's own: a caller's are dropped at the intake.
INTERNAL_HEADER_PREFIX = "inferstream-"
_MAX_SEAL_BYTES = 4096
_LEN = struct.Struct(">Q")

Headers = list[tuple[str, bytes]]


class SealError(Exception):
    """An event on an internal topic without a valid seal."""


class Sealer:
    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        self._key = secret.encode()

    def seal(self, topic: str, key: bytes | None, value: bytes, claims: dict[str, Any]) -> tuple[str, bytes]:
        """The seal header for an event the product writes."""
        body = orjson.dumps(claims, option=orjson.OPT_SORT_KEYS)
        mac = self._mac(topic, key, value, body)
        return SEAL_HEADER, base64.urlsafe_b64encode(body) + b"." + mac.hex().encode()

    def open(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> dict[str, Any]:
        """The claims of a sealed event; raises SealError when the seal is missing or does not match."""
        seals = [v for k, v in headers if k == SEAL_HEADER]
        if len(seals) != 1:
            raise SealError("no seal" if not seals else "more than one seal")
        seal = seals[0]
        if not isinstance(seal, bytes) or len(seal) > _MAX_SEAL_BYTES or seal.count(b".") != 1:
            raise SealError("malformed seal")
        encoded, mac = seal.split(b".")
        try:
            body = base64.urlsafe_b64decode(encoded)
            expected = bytes.fromhex(mac.decode("ascii"))
        except (binascii.Error, ValueError):
            raise SealError("malformed seal") from None
        if not hmac.compare_digest(expected, self._mac(topic, key, value, body)):
            raise SealError("seal does not match the event")
        claims = orjson.loads(body)
        if not isinstance(claims, dict):
            raise SealError("malformed seal claims")
        return claims

    def _mac(self, topic: str, key: bytes | None, value: bytes, claims: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        # Length-prefixed parts: no two different events share the MAC's input. A missing key
        # (None) differs from an empty one.
        parts = (topic.encode(), b"\x00" if key is None else b"\x01" + key, claims, value)
        for part in parts:
            mac.update(_LEN.pack(len(part)))
            mac.update(part)
        return mac.digest()


def external_headers(headers: Headers) -> Headers:
    """The headers without the product's namespace: what a caller may set."""
    return [(k, v) for k, v in headers if not k.lower().startswith(INTERNAL_HEADER_PREFIX)]
