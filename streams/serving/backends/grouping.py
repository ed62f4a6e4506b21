"""How a backend runs a micro-batch as few model calls as its requests' shapes allow: requests
whose non-batch dims agree form a group, concatenated along the batch axis into one call, whose
outputs are split back into one set per request."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from streams.serving.backends import Tensors
from topics.errors import ErrorCode, EventError

log = logging.getLogger(__name__)


def group_requests(batch: list[Tensors], max_rows: int) -> list[list[int]]:
    """Indexes of requests whose non-batch dims agree, in chunks of at most `max_rows` rows (a
    larger request goes alone)."""
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, tensors in enumerate(batch):
        by_shape[tuple((n, t.dtype.str, t.shape[1:]) for n, t in sorted(tensors.items()))].append(i)
    groups: list[list[int]] = []
    for indexes in by_shape.values():
        chunk: list[int] = []
        rows = 0
        for i in indexes:
            n = next(iter(batch[i].values())).shape[0]
            if chunk and rows + n > max_rows:
                groups.append(chunk)
                chunk, rows = [], 0
            chunk.append(i)
            rows += n
        groups.append(chunk)
    return groups


def concat_rows(members: list[Tensors]) -> Tensors:
    """One group's requests as one input, concatenated along the batch axis."""
    if len(members) == 1:
        return members[0]
    return {n: np.concatenate([m[n] for m in members]) for n in members[0]}


def split_rows(outputs: Tensors, members: list[Tensors]) -> list[Tensors]:
    """A group's outputs split back into one set per request, by each request's rows."""
    if len(members) == 1:
        return [outputs]
    first = next(iter(members[0]))
    bounds = np.cumsum([m[first].shape[0] for m in members])[:-1]
    split = {n: np.split(a, bounds) for n, a in outputs.items()}
    return [{n: split[n][k] for n in split} for k in range(len(members))]


def scatter(groups: list[list[int]], outcomes: list[list]) -> list:
    """Per-request results in request order, from each group's list of results."""
    results: list = [None] * sum(len(g) for g in groups)
    for indexes, group_outcomes in zip(groups, outcomes):
        for i, outcome in zip(indexes, group_outcomes):
            results[i] = outcome
    return results


def group_failed(model: str, count: int, exc: BaseException) -> list[EventError]:
    """The same INFERENCE_FAILED error for each of a failed group's `count` requests."""
    log.warning("%s: inference failed for %d requests: %s", model, count, exc)
    return [EventError(ErrorCode.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}")] * count
