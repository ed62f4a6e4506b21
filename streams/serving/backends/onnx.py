"""In-process onnxruntime backend: runs one micro-batch of requests as few session calls as
their shapes allow (requests are concatenated along the batch axis, then split back).

An image model's requests may carry their image as uint8 pixels or encoded files
(`ModelInfo.image_input`): each request's images are decoded to uint8 pixels on their own (an
image that does not decode fails its request alone, INVALID_IMAGE), and each group's pixels are
normalised to the model's float32 input in one vectorised pass before its session call.

A registration's check: the artifact loads and its graph has the declared signature
(`read_signature` also gives a registration that declares none its signature).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from streams.registry.records import BackendSpec, ModelInfo, TensorSignature
from streams.serving.backends import Backend, Tensors
from streams.serving.backends.grouping import concat_rows, group_failed, group_requests, scatter, split_rows
from streams.serving.images import ImageError, decode_rows, normalize_pixels
from streams.settings import Settings, get_settings
from topics.errors import ErrorCode, EventError

log = logging.getLogger(__name__)


def providers() -> list[str]:
    """CUDA first when this onnxruntime build and machine have it, else CPU."""
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return preferred or available


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


# One refusal whatever the cause: a missing file or object, or one that is no model; the message
# must not tell a caller what exists on this machine.
UNLOADABLE = "{key}: the artifact does not load as an ONNX model"
ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
             "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def read_signature(path: Path, key: str) -> tuple[list[TensorSignature], list[TensorSignature]]:
    """An artifact's inputs and outputs, as a version record declares them; ValueError
    (UNLOADABLE) when it does not load."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure is a refusal
        log.info("%s: %s does not load: %r", key, path, exc)
        raise ValueError(UNLOADABLE.format(key=key)) from None

    def signature(nodes) -> list[TensorSignature]:
        return [TensorSignature(name=n.name, dtype=ORT_TYPES.get(n.type, n.type),
                                shape=[d if isinstance(d, int) else -1 for d in n.shape]) for n in nodes]

    return signature(session.get_inputs()), signature(session.get_outputs())


def check_signature(kind: str, declared: list[TensorSignature], actual: list[TensorSignature]) -> None:
    """ValueError unless the artifact's inputs (or outputs) are the declared ones: names, dtypes,
    and sizes wherever neither side is dynamic."""
    graph = {a.name: a for a in actual}
    if set(graph) != {d.name for d in declared}:
        raise ValueError(f"{kind}s {sorted(graph)} of the artifact differ from the signature "
                         f"{sorted(d.name for d in declared)}")
    for spec in declared:
        node = graph[spec.name]
        if node.dtype != spec.dtype or len(node.shape) != len(spec.shape) or any(
            a != -1 and s != -1 and a != s for a, s in zip(node.shape, spec.shape)
        ):
            raise ValueError(f"{kind} {spec.name!r}: the artifact has {node.dtype}{node.shape}, "
                             f"the signature says {spec.dtype}{spec.shape}")


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

    @classmethod
    async def check(cls, info: ModelInfo, spec: BackendSpec, settings: Settings) -> None:
        """The artifact must load and match the declared signature."""
        inputs, outputs = await asyncio.to_thread(read_signature, info.path, info.key)
        check_signature("input", info.inputs, inputs)
        check_signature("output", info.outputs, outputs)

    @classmethod
    async def load(cls, info: ModelInfo, spec: BackendSpec, settings: Settings) -> OnnxModel:
        return await asyncio.to_thread(cls.from_settings, info, settings)

    async def close(self) -> None:
        """Nothing to release: the session goes with the model."""

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


# The class BACKENDS["onnxruntime"] stands for; typed, so that mypy checks it follows Backend.
BACKEND: type[Backend] = OnnxModel
