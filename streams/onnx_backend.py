"""In-process onnxruntime backend: runs one micro-batch of requests as few session calls as
their shapes allow (requests are concatenated along the batch axis, then split back)."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnxruntime as ort

from streams.registry import ModelInfo
from topics.errors import ErrorCode, EventError

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


def providers() -> list[str]:
    """CUDA first when this onnxruntime build and machine have it, else CPU."""
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return preferred or available


def group_requests(batch: list[Tensors], max_rows: int) -> list[list[int]]:
    """Indexes of requests whose non-batch dims agree, in chunks of at most `max_rows` rows (a
    larger request goes alone)."""
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, tensors in enumerate(batch):
        by_shape[tuple((n, t.shape[1:]) for n, t in sorted(tensors.items()))].append(i)
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


class OnnxModel:
    def __init__(self, info: ModelInfo, intra_op_threads: int = 0) -> None:
        self.info = info
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(info.path), options, providers=providers())
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._check_signature()
        log.info("loaded %s v%s on %s", info.name, info.version, self.session.get_providers()[0])

    def _check_signature(self) -> None:
        graph_inputs = {i.name for i in self.session.get_inputs()}
        declared = {s.name for s in self.info.inputs}
        if graph_inputs != declared or set(self.output_names) != {s.name for s in self.info.outputs}:
            raise RuntimeError(
                f"{self.info.path}: graph inputs {sorted(graph_inputs)} / outputs {self.output_names}"
                f" differ from inferstream.json ({sorted(declared)})"
            )

    def run(self, inputs: Tensors) -> Tensors:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))

    def run_batch(self, batch: list[Tensors]) -> list[Tensors | BaseException]:
        """One entry per request: its outputs, or the error that hit its group."""
        groups = group_requests(batch, self.info.max_batch_size)
        return scatter(groups, [self._run_group([batch[i] for i in g]) for g in groups])

    def _run_group(self, members: list[Tensors]) -> list[Tensors] | list[EventError]:
        try:
            return split_rows(self.run(concat_rows(members)), members)
        except Exception as exc:  # noqa: BLE001 - reported per request, the worker goes on
            return group_failed(self.info.name, len(members), exc)
