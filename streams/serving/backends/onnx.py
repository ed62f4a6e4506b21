"""In-process onnxruntime backend: runs one micro-batch of requests as few session calls as
their shapes allow (requests are concatenated along the batch axis, then split back).

An image model's requests may carry their image as uint8 pixels or encoded files
(`ModelInfo.image_input`): each request's images are decoded to uint8 pixels on their own (an
image that does not decode fails its request alone, INVALID_IMAGE), and each group's pixels are
normalised to the model's float32 input in one vectorised pass before its session call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections import defaultdict

import numpy as np
import onnxruntime as ort

from streams.registry.records import ModelInfo
from streams.serving.images import ImageError, decode_rows, normalize_pixels
from streams.settings import Settings, get_settings
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


def session_options(intra_op_threads: int, cpu_mem_arena: bool, allow_spinning: bool) -> ort.SessionOptions:
    """The worker's session options (see the onnx_* settings for why each is what it is)."""
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    options.enable_cpu_mem_arena = cpu_mem_arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return options


_LIBC_NAME = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC_NAME), "malloc_trim", None) if _LIBC_NAME else None
# A batch whose run took this long is followed by a trim (well under 1% of its time).
TRIM_AFTER_S = 0.05


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere).
    Loading a model leaves its parsed protobuf's memory free but held (about twice the model's
    size), and without the memory arena a batch's activations, freed, stay with malloc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ImageInputs:
    """Turns an image model's pixels and encoded forms into its float32 input, in two steps: per
    request (`prepare`: decode its files; a bad one fails that request alone) and per group of
    requests run together (`float_inputs`: normalise all their pixels in one pass). Any backend
    can use it before handing a batch to its model; requests in other forms pass through."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info

    def prepare(self, tensors: Tensors) -> Tensors | EventError:
        """The request's image, if it came as pixels or files, as uint8 HWC pixels under the
        image tensor's name; the request as it is otherwise."""
        image = self.info.image_input
        if image is None or image.tensor in tensors:
            return tensors
        rest = {n: t for n, t in tensors.items() if n not in (image.pixels, image.encoded)}
        if image.pixels in tensors:
            pixels = tensors[image.pixels]
            return {**rest, image.tensor: pixels if image.layout == "HWC" else pixels.transpose(0, 2, 3, 1)}
        try:
            assert image.encoded is not None  # routing.check_inputs admitted one of the forms
            decoded = decode_rows(list(tensors[image.encoded].reshape(-1)), self.info.preprocessing or {},
                                  image.max_pixels)
        except ImageError as exc:
            return EventError(ErrorCode.INVALID_IMAGE, str(exc))
        except Exception as exc:  # noqa: BLE001 - this request fails, the batch goes on
            return group_failed(self.info.name, 1, exc)[0]
        return {**rest, image.tensor: decoded}

    def float_inputs(self, inputs: Tensors) -> Tensors:
        """Prepared inputs (one request's or a group's, concatenated) as the graph takes them."""
        image = self.info.image_input
        if image is None or inputs[image.tensor].dtype != np.uint8:
            return inputs
        normalize = (self.info.preprocessing or {})["normalize"]
        return {**inputs, image.tensor: normalize_pixels(inputs[image.tensor], normalize)}


class OnnxModel:
    def __init__(self, info: ModelInfo, intra_op_threads: int | None = None, *, cpu_mem_arena: bool | None = None,
                 allow_spinning: bool | None = None, cpu_max_rows: int | None = None) -> None:
        """Unset options take the process's settings (`get_settings()`: INFERSTREAM_ONNX_* env
        vars); `from_settings` takes another Settings' values."""
        self.info = info
        self.images = ImageInputs(info)

        def setting(name: str, value):
            return getattr(get_settings(), f"onnx_{name}") if value is None else value

        options = session_options(setting("intra_op_threads", intra_op_threads),
                                  setting("cpu_mem_arena", cpu_mem_arena), setting("allow_spinning", allow_spinning))
        self.session = ort.InferenceSession(str(info.path), options, providers=providers())
        release_free_memory()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._check_signature()
        provider = self.session.get_providers()[0]
        cap = setting("cpu_max_rows", cpu_max_rows) if provider == "CPUExecutionProvider" else 0
        self.max_rows = min(info.max_batch_size, cap) if cap else info.max_batch_size  # rows per session call
        log.info("loaded %s v%s on %s", info.name, info.version, provider)

    @classmethod
    def from_settings(cls, info: ModelInfo, settings: Settings) -> OnnxModel:
        return cls(info, settings.onnx_intra_op_threads, cpu_mem_arena=settings.onnx_cpu_mem_arena,
                   allow_spinning=settings.onnx_allow_spinning, cpu_max_rows=settings.onnx_cpu_max_rows)

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
        """One entry per request: its outputs, or the error that hit it (its images) or its group.
        Requests run together in session calls of at most `max_rows` rows."""
        started = time.monotonic()
        entries = [self.images.prepare(tensors) for tensors in batch]
        ready = {i: entry for i, entry in enumerate(entries) if not isinstance(entry, EventError)}
        prepared = list(ready.values())
        groups = group_requests(prepared, self.max_rows)
        outcomes = scatter(groups, [self._run_group([prepared[i] for i in g]) for g in groups])
        results: list[Tensors | BaseException] = list(entries)
        for i, outcome in zip(ready, outcomes):
            results[i] = outcome
        if time.monotonic() - started >= TRIM_AFTER_S:
            release_free_memory()
        return results

    def _run_group(self, members: list[Tensors]) -> list[Tensors] | list[EventError]:
        try:
            return split_rows(self.run(self.images.float_inputs(concat_rows(members))), members)
        except Exception as exc:  # noqa: BLE001 - reported per request, the worker goes on
            return group_failed(self.info.name, len(members), exc)
