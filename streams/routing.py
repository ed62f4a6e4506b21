"""Routing and request validation, free of Kafka: which topic and model version serve a request,
and whether its tensors fit the model's signature."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streams.registry import ModelInfo, ModelRegistry
from topics.errors import ErrorCode, EventError
from topics.events import InferenceRequest
from topics.names import Topics, valid_topic


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
    """Raise INVALID_TENSOR unless the tensors match the signature; return the row count."""
    expected = {s.name: s for s in model.inputs}
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
        if array.dtype.name != spec.dtype:
            raise EventError(ErrorCode.INVALID_TENSOR, f"input {name!r} must be {spec.dtype}, got {array.dtype.name}")
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
    return count
