"""A batch job's input in S3: a JSONL of Open Inference Protocol requests, or a prefix of images,
as items in a fixed order. Read by the bridge (to check and count a submission) and by the worker
that runs the batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from streams.registry.records import ModelInfo
from streams.serving.images import image_to_tensor, load_image
from streams.serving.oip import Limits, ProtocolError, parse_infer_request
from streams.storage.objects import ObjectStore, parse_uri
from topics.errors import ErrorCode, EventError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class Item:
    """One batch item: its caller-given id and how to get its input tensors."""

    item_id: str
    load: Callable[[], dict[str, np.ndarray]]  # raises EventError for a bad item


def list_items(store: ObjectStore, uri: str, model: ModelInfo, limits: Limits) -> list[Item]:
    """The batch's items in a fixed order: JSONL lines in file order, images by key."""
    bucket, key = parse_uri(store.check_caller_uri(uri))
    if key.endswith(".jsonl"):
        return _jsonl_items(store.get(uri), limits)
    preprocessing = model.preprocessing
    if not preprocessing:
        raise EventError(ErrorCode.INVALID_SCHEMA, f"model {model.name} takes no images; give a .jsonl input")
    keys = sorted(
        o.object_name for o in store.client.list_objects(bucket, prefix=key, recursive=True)
        if o.object_name.lower().endswith(IMAGE_SUFFIXES) and store.caller_may_read(bucket, o.object_name)
    )
    return [Item(k.rsplit("/", 1)[-1], _image_loader(store, f"s3://{bucket}/{k}", model, preprocessing)) for k in keys]


def _jsonl_items(data: bytes, limits: Limits) -> list[Item]:
    items = []
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            items.append(Item(_line_id(line) or str(number), _line_loader(line, number, limits)))
    return items


def _line_id(line: bytes) -> str | None:
    """The line's own "id", when it has one (a bad line is reported when it is loaded)."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    item_id = value.get("id") if isinstance(value, dict) else None
    return item_id if isinstance(item_id, str) and item_id else None


def _line_loader(line: bytes, number: int, limits: Limits) -> Callable[[], dict[str, np.ndarray]]:
    def load() -> dict[str, np.ndarray]:
        try:
            return parse_infer_request(line, None, limits).inputs
        except ProtocolError as exc:
            raise EventError(ErrorCode.INVALID_TENSOR, f"line {number}: {exc}") from None

    return load


def _image_loader(
    store: ObjectStore, uri: str, model: ModelInfo, preprocessing: dict[str, Any]
) -> Callable[[], dict[str, np.ndarray]]:
    def load() -> dict[str, np.ndarray]:
        try:
            image = load_image(store.get(uri))
        except (OSError, ValueError) as exc:
            raise EventError(ErrorCode.INVALID_TENSOR, f"{uri} is not a readable image: {exc}") from None
        return {model.inputs[0].name: image_to_tensor(image, preprocessing)}

    return load
