"""Routing and request validation, free of Kafka: which topic and model version serve a request,
and whether its tensors fit the model's signature."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streams.registry.records import ModelInfo, ModelRegistry, TensorSignature
from streams.serving.images import ImageError, image_header
from topics.errors import ErrorCode, EventError
from topics.events import InferenceRequest
from topics.names import Topics, valid_topic
from topics.tensors import dtype_name


@dataclass(frozen=True)
class Route:
    topic: str
    model: ModelInfo


class Router:
    def __init__(self, registry: ModelRegistry, topics: Topics) -> None:
        self.registry = registry
        self.topics = topics

    def route(self, request: InferenceRequest, now_ms: int, key: str | None = None) -> Route:
        """`key` makes the choice among weighted versions sticky (the request's Kafka key)."""
        check_deadline(request, now_ms)
        if request.reply_to is not None and not valid_topic(request.reply_to):
            raise EventError(ErrorCode.INVALID_SCHEMA, f"reply_to {request.reply_to!r} is not a valid topic name")
        if not request.inputs and request.inputs_ref is None:
            raise EventError(ErrorCode.INVALID_TENSOR, "request has no inputs and no inputs_ref")
        model = self.registry.resolve(request.model, request.version, key)
        return Route(self.topics.model(model.name), model)


def check_deadline(request: InferenceRequest, now_ms: int) -> None:
    if request.deadline_ms is not None and now_ms > request.deadline_ms:
        raise EventError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"deadline passed {now_ms - request.deadline_ms} ms before the request was served",
        )


def check_inputs(model: ModelInfo, tensors: dict[str, np.ndarray]) -> int:
    """Raise INVALID_TENSOR unless the tensors match the signature (an image model's image input
    in any of its forms), INVALID_IMAGE for an encoded image that is over its bounds or in no
    format read here (its header only: the worker decodes it); return the row count."""
    expected = {s.name: s for s in caller_signature(model, tensors)}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise EventError(
            ErrorCode.INVALID_TENSOR,
            f"model {model.name} takes inputs {sorted(expected)}; missing {missing}, unexpected {extra}",
        )
    rows: set[int] = set()
    for name, spec in expected.items():
        array = tensors[name]
        dtype = dtype_name(array)
        if dtype != spec.dtype:
            raise EventError(ErrorCode.INVALID_TENSOR, f"input {name!r} must be {spec.dtype}, got {dtype}")
        if len(array.shape) != len(spec.shape) or any(
            want != -1 and want != got for want, got in zip(spec.shape, array.shape)
        ):
            raise EventError(
                ErrorCode.INVALID_TENSOR,
                f"input {name!r} must have shape {spec.shape} (-1 = any), got {list(array.shape)}",
            )
        rows.add(array.shape[0])
    if len(rows) != 1:
        raise EventError(ErrorCode.INVALID_TENSOR, f"inputs disagree on the batch size: {sorted(rows)}")
    (count,) = rows
    if not 1 <= count <= model.max_batch_size:
        raise EventError(
            ErrorCode.INVALID_TENSOR,
            f"batch axis must be 1..{model.max_batch_size} for {model.name}, got {count}",
        )
    image = model.image_forms
    if image is not None and image.encoded in tensors:
        check_encoded(tensors[image.encoded], image.max_bytes, image.max_pixels)
    return count


def caller_signature(model: ModelInfo, tensors: dict[str, np.ndarray]) -> list[TensorSignature]:
    """The inputs a request must carry: the graph's, with an image model's image tensor replaced
    by the form of it the request carries (float32 tensor, uint8 pixels or encoded image)."""
    image = model.image_forms
    if image is None:
        return model.inputs
    forms = {s.name: s for s in [*(s for s in model.inputs if s.name == image.tensor),
                                 *image.forms(model.crop)]}
    given = [name for name in forms if name in tensors]
    if len(given) != 1:
        choices = ", ".join(f"{s.name!r} ({s.dtype} {s.shape})" for s in forms.values())
        raise EventError(ErrorCode.INVALID_TENSOR, f"model {model.name} takes its image as one of {choices}; "
                         f"got {'none' if not given else ', '.join(map(repr, given))}")
    return [forms[given[0]] if s.name == image.tensor else s for s in model.inputs]


def check_encoded(images: np.ndarray, max_bytes: int, max_pixels: int) -> None:
    """Every element an image file within the bounds, by its header (INVALID_IMAGE otherwise)."""
    for row, data in enumerate(images.reshape(-1)):
        where = f"row {row}: " if images.size > 1 else ""
        if not isinstance(data, bytes):  # a str would be taken for a file name
            raise EventError(ErrorCode.INVALID_TENSOR, f"{where}an encoded image is bytes, got {type(data).__name__}")
        if not 0 < len(data) <= max_bytes:
            raise EventError(ErrorCode.INVALID_IMAGE, f"{where}an image file is 1 to {max_bytes:,} bytes, "
                             f"got {len(data):,}")
        try:
            image_header(data, max_pixels)
        except ImageError as exc:
            raise EventError(ErrorCode.INVALID_IMAGE, f"{where}{exc}") from None
