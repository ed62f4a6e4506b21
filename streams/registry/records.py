"""The model registry: models, their versions and how requests reach them.

A version record (`ModelInfo`) holds the artifact, backends, signature, pre/post-processing,
status (active, draft, retired), batching settings and routing weight. PostgreSQL is the
source of truth (`streams.registry.store`); every change is also published on a compacted
topic, from which every worker and bridge keeps its in-memory `ModelRegistry` current.
Built models are registered from the model repository (Triton layout:
`<repo>/<name>/<version>/model.onnx` beside `<repo>/<name>/inferstream.json`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from streams.registry.weights import choose, version_order
from streams.serving.backends import BACKENDS, BackendKind
from streams.serving.images import (
    MAX_PIXELS,
    NORMALIZERS,
    crop_pixels,
    encoded_tensor,
    image_header,
    image_to_tensor,
    load_image,
)
from topics.errors import ErrorCode, EventError

VersionStatus = Literal["active", "draft", "retired"]
# Model names and versions name topics, S3 keys and directories: one safe pattern everywhere.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
NAME_RULE = "1-128 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"


class TensorSignature(BaseModel):
    name: str
    dtype: str
    shape: list[int]  # -1 marks a dynamic axis (the batch axis first)


class ImageInput(BaseModel):
    """The forms an image model's image input takes besides its float32 tensor.

    A request carries its image input as exactly one of:
    - `tensor`: the graph's float32 [N, 3, crop, crop], prepared by the caller;
    - `pixels`: uint8 [N, crop, crop, 3] (layout HWC) or [N, 3, crop, crop] (CHW), already
      resized and cropped: the worker only normalises it (4x smaller than float32);
    - `encoded`: bytes [N, 1], one image file per row (JPEG, PNG, ...): the worker decodes,
      resizes, crops and normalises it (the smallest form for photos).
    The worker turns pixels and encoded images into the float32 tensor once per batch, with the
    model's `preprocessing`; an image that does not decode fails its own request (INVALID_IMAGE).
    """

    model_config = ConfigDict(extra="forbid")
    tensor: str  # the graph input the image feeds
    pixels: str | None = None
    layout: Literal["HWC", "CHW"] = "HWC"
    encoded: str | None = None
    # Bounds on an encoded image, checked before it is decoded: its size, and width x height as
    # its header says (a small file may decode to a huge image).
    max_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_pixels: int = Field(MAX_PIXELS, gt=0)

    def forms(self, crop: int) -> list[TensorSignature]:
        """The signatures of the pixels and encoded forms (those the model declares)."""
        forms = []
        if self.pixels:
            shape = [-1, crop, crop, 3] if self.layout == "HWC" else [-1, 3, crop, crop]
            forms.append(TensorSignature(name=self.pixels, dtype="uint8", shape=shape))
        if self.encoded:
            forms.append(TensorSignature(name=self.encoded, dtype="bytes", shape=[-1, 1]))
        return forms


class BackendSpec(BaseModel):
    """Where a version runs: a kind of `streams.serving.backends.BACKENDS` (in the worker,
    onnxruntime; on a server, triton) and, for a server, where it is."""

    kind: BackendKind = "onnxruntime"
    url: str | None = None  # triton: host:port
    protocol: Literal["grpc", "http"] = "grpc"
    model_name: str | None = None  # the model's name on the Triton server, when it differs

    @property
    def label(self) -> str:
        return self.kind if self.url is None else f"{self.kind}-{self.protocol}://{self.url}"


class ModelInfo(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)
    max_batch_size: int
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    labels: str | None = None
    preprocessing: dict[str, Any] | None = None
    image_input: ImageInput | None = None  # pixels and encoded forms of the image input
    postprocessing: str | None = None
    description: str = ""
    path: Path  # the version's model.onnx (downloaded here when the artifact is in S3)
    artifact: str | None = None  # where the model came from: a local path or s3://bucket/key
    backends: list[BackendSpec] = Field(default_factory=lambda: [BackendSpec()])
    status: VersionStatus = "active"
    weight: int = Field(100, ge=0)  # share of unversioned requests among active versions
    shadow: bool = False  # mirror unversioned requests here; results stored, never returned
    max_batch_delay_ms: float | None = None  # batching override for this version
    revision: int = 0  # raised on every change; a stale copy never overwrites a newer one

    @model_validator(mode="after")
    def _image_input_fits(self) -> ModelInfo:
        image = self.image_input
        if image is None:
            return self
        pre = self.preprocessing or {}
        if pre.get("kind") != "image" or pre.get("normalize") not in NORMALIZERS or not all(
            isinstance(pre.get(k), int) and pre[k] > 0 for k in ("resize", "crop")
        ):
            raise ValueError("image_input needs preprocessing {kind: image, resize, crop, normalize: one of "
                             f"{sorted(NORMALIZERS)}}}")
        if not image.pixels and not image.encoded:
            raise ValueError("image_input names neither a pixels nor an encoded input")
        names = [image.tensor, *(f.name for f in image.forms(pre["crop"]))]
        if len(set(names)) != len(names):
            raise ValueError(f"image_input names an input twice: {names}")
        if self.inputs:  # a registration's draft has its signature read from the artifact later
            graph = {s.name: s for s in self.inputs}
            if set(names[1:]) & set(graph):
                raise ValueError(f"image_input's forms {names[1:]} must not be graph inputs")
            spec = graph.get(image.tensor)
            if spec is None or spec.dtype != "float32" or spec.shape[1:] != [3, pre["crop"], pre["crop"]]:
                raise ValueError(f"image_input.tensor {image.tensor!r} must be a float32 graph input of shape "
                                 f"[-1, 3, {pre['crop']}, {pre['crop']}]")
        return self

    @property
    def image_forms(self) -> ImageInput | None:
        """The image input's other forms, where every backend of the version takes them (the
        onnxruntime backend prepares them in the worker; a Triton server takes the float32 tensor)."""
        if self.image_input is None or any(not BACKENDS[b.kind].prepares_images for b in self.backends):
            return None
        return self.image_input

    def image_file_inputs(self, data: bytes) -> dict[str, np.ndarray]:
        """An image file as this model's image input, in the smallest form it takes: the file
        itself (encoded), else its pixels, else the float32 tensor (decoded here for those two).
        Raises streams.serving.images.ImageError."""
        pre, image = self.preprocessing or {}, self.image_forms
        if image is not None and image.encoded:
            image_header(data, image.max_pixels)  # a file that is no image fails here, not in the worker
            return {image.encoded: encoded_tensor([data])}
        bound = self.image_input.max_pixels if self.image_input else MAX_PIXELS
        decoded = load_image(data, bound, min_side=pre.get("resize"))
        if image is not None and image.pixels:
            pixels = crop_pixels(decoded, pre["resize"], pre["crop"])[np.newaxis]
            return {image.pixels: pixels if image.layout == "HWC" else pixels.transpose(0, 3, 1, 2)}
        tensor = self.image_input.tensor if self.image_input else self.inputs[0].name
        return {tensor: image_to_tensor(decoded, pre)}

    @property
    def crop(self) -> int:
        """The side of the image tensor's square (image models)."""
        return int((self.preprocessing or {})["crop"])

    @property
    def model_dir(self) -> Path:
        return self.path.parent.parent

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"


def load_repository(repository: Path, only: list[str] | None = None) -> list[ModelInfo]:
    """The versions built in a model repository, as registry records."""
    found: list[ModelInfo] = []
    if repository.is_dir():
        for meta in sorted(repository.glob("*/inferstream.json")):
            name = meta.parent.name
            if only and name not in only:
                continue
            base = {k: v for k, v in json.loads(meta.read_text()).items() if k != "backend"}
            for onnx in sorted(meta.parent.glob("*/model.onnx")):
                if onnx.parent.name.isdigit():
                    found.append(ModelInfo(**{**base, "name": name, "version": onnx.parent.name,
                                              "path": onnx, "artifact": str(onnx)}))
    missing = sorted(set(only or []) - {m.name for m in found})
    if missing:
        raise FileNotFoundError(f"models {missing} are not built in {repository}; run `inferstream models build`")
    return found


class ModelRegistry:
    def __init__(self, models: Iterable[ModelInfo] = ()) -> None:
        self._models: dict[str, dict[str, ModelInfo]] = {}
        for info in models:
            self.apply(info)

    @classmethod
    def load(cls, repository: Path, only: list[str] | None = None) -> ModelRegistry:
        return cls(load_repository(repository, only))

    def apply(self, info: ModelInfo) -> bool:
        """Take a record unless a newer revision is already here; True when it changed."""
        current = self._models.get(info.name, {}).get(info.version)
        if current is not None and current.revision > info.revision:
            return False
        self._models.setdefault(info.name, {})[info.version] = info
        return current != info

    @property
    def names(self) -> list[str]:
        return sorted(name for name, versions in self._models.items() if self._live(versions))

    def all(self) -> list[ModelInfo]:
        return [info for name in sorted(self._models) for _, info in sorted(self._models[name].items())]

    def versions(self, name: str) -> list[str]:
        """Versions that can serve (active or draft), in numeric order."""
        return sorted(self._live(self._models.get(name, {})), key=version_order)

    @staticmethod
    def _live(versions: dict[str, ModelInfo]) -> dict[str, ModelInfo]:
        return {v: info for v, info in versions.items() if info.status != "retired"}

    def get(self, name: str, version: str) -> ModelInfo | None:
        return self._models.get(name, {}).get(version)

    def resolve(self, name: str, version: str | None = None, key: str | None = None) -> ModelInfo:
        """A named version (active or draft), or, when none is named, an active version chosen
        by weight, sticky per `key` (the newest active version when there is no key)."""
        versions = self._live(self._models.get(name, {}))
        if not versions:
            raise EventError(ErrorCode.UNKNOWN_MODEL, f"unknown model {name!r}; served: {self.names}")
        if version is not None:
            try:
                return versions[version]
            except KeyError:
                raise EventError(
                    ErrorCode.UNKNOWN_VERSION,
                    f"model {name!r} has no version {version!r}; versions: {self.versions(name)}",
                ) from None
        active = {info.version: info for info in self.routable(name)}
        weights = {v: info.weight for v, info in active.items()}
        if not weights:
            raise EventError(ErrorCode.UNKNOWN_VERSION, f"model {name!r} has no active version with weight")
        if key is None or len(weights) == 1:
            return active[max(weights, key=version_order)]
        return active[choose(weights, key)]

    def routable(self, name: str) -> list[ModelInfo]:
        """The versions a request without a version may reach: active, not shadow, with weight."""
        return [info for info in self._live(self._models.get(name, {})).values()
                if info.status == "active" and not info.shadow and info.weight > 0]

    def shadows(self, name: str) -> list[ModelInfo]:
        return [i for i in self._live(self._models.get(name, {})).values() if i.shadow and i.status == "active"]

