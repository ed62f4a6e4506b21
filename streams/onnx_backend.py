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
        results: list[Tensors | BaseException] = [None] * len(batch)  # type: ignore[list-item]
        for indexes in self._groups(batch):
            members = [batch[i] for i in indexes]
            try:
                outputs = self._run_group(members)
            except Exception as exc:  # noqa: BLE001 - reported per request, the worker goes on
                log.warning("%s: inference failed for %d requests: %s", self.info.name, len(indexes), exc)
                error = EventError(ErrorCode.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}")
                outputs = [error] * len(indexes)
            for i, out in zip(indexes, outputs):
                results[i] = out
        return results

    def _groups(self, batch: list[Tensors]) -> list[list[int]]:
        """Requests whose non-batch dims agree, in chunks of at most max_batch_size rows."""
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, tensors in enumerate(batch):
            by_shape[tuple((n, t.shape[1:]) for n, t in sorted(tensors.items()))].append(i)
        groups: list[list[int]] = []
        for indexes in by_shape.values():
            chunk: list[int] = []
            rows = 0
            for i in indexes:
                n = next(iter(batch[i].values())).shape[0]
                if chunk and rows + n > self.info.max_batch_size:
                    groups.append(chunk)
                    chunk, rows = [], 0
                chunk.append(i)
                rows += n
            groups.append(chunk)
        return groups

    def _run_group(self, members: list[Tensors]) -> list[Tensors]:
        if len(members) == 1:
            return [self.run(members[0])]
        names = list(members[0])
        stacked = {n: np.concatenate([m[n] for m in members]) for n in names}
        outputs = self.run(stacked)
        bounds = np.cumsum([m[names[0]].shape[0] for m in members])[:-1]
        split = {n: np.split(a, bounds) for n, a in outputs.items()}
        return [{n: split[n][k] for n in split} for k in range(len(members))]
