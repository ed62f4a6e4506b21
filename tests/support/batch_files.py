"""A batch's JSONL input put in S3, and its JSONL output read back."""

from __future__ import annotations

import numpy as np
import orjson

from streams.settings import Settings
from streams.storage.objects import ObjectStore
from support.bridge import oip_inputs


def put_jsonl(settings: Settings, key: str, xs: list[np.ndarray], bad_lines: int = 0) -> str:
    """One line per tiny input (ids item-0, item-1...), then `bad_lines` lines no model can take;
    the object's s3:// URI."""
    lines = [orjson.dumps({"id": f"item-{i}", "inputs": oip_inputs(x)}) for i, x in enumerate(xs)]
    lines += [b'{"id": "broken", "inputs": [{"name": "x"}]}'] * bad_lines
    store = ObjectStore(settings)
    store.ensure_bucket()
    return store.put(key, b"\n".join(lines) + b"\n")


def read_output(settings: Settings, uri: str) -> list[dict]:
    return [orjson.loads(line) for line in ObjectStore(settings).get(uri).splitlines()]
