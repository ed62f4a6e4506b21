"""The model registry of a worker: what models and versions exist and their signatures.

Read from the model repository (Triton layout): `<repo>/<name>/<version>/model.onnx` beside
`<repo>/<name>/inferstream.json`, which holds the signature and pre/post-processing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from topics.errors import ErrorCode, EventError


class TensorSignature(BaseModel):
    name: str
    dtype: str
    shape: list[int]  # -1 marks a dynamic axis (the batch axis first)


class ModelInfo(BaseModel):
    name: str
    version: str
    backend: Literal["onnxruntime"] = "onnxruntime"
    max_batch_size: int
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    labels: str | None = None
    preprocessing: dict[str, Any] | None = None
    postprocessing: str | None = None
    description: str = ""
    path: Path  # the version's model.onnx

    @property
    def model_dir(self) -> Path:
        return self.path.parent.parent


class ModelRegistry:
    def __init__(self, models: dict[str, dict[str, ModelInfo]]) -> None:
        self._models = models

    @classmethod
    def load(cls, repository: Path, only: list[str] | None = None) -> ModelRegistry:
        models: dict[str, dict[str, ModelInfo]] = {}
        if repository.is_dir():
            for meta in sorted(repository.glob("*/inferstream.json")):
                name = meta.parent.name
                if only and name not in only:
                    continue
                base = json.loads(meta.read_text())
                versions = {
                    onnx.parent.name: ModelInfo(**{**base, "name": name, "version": onnx.parent.name, "path": onnx})
                    for onnx in meta.parent.glob("*/model.onnx")
                    if onnx.parent.name.isdigit()
                }
                if versions:
                    models[name] = versions
        missing = sorted(set(only or []) - set(models))
        if missing:
            raise FileNotFoundError(
                f"models {missing} are not built in {repository}; run `inferstream models build`"
            )
        return cls(models)

    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=int)

    def resolve(self, name: str, version: str | None = None) -> ModelInfo:
        """The requested version, or the newest one when none is named."""
        versions = self._models.get(name)
        if not versions:
            raise EventError(ErrorCode.UNKNOWN_MODEL, f"unknown model {name!r}; served: {self.names}")
        if version is None:
            return versions[max(versions, key=int)]
        try:
            return versions[version]
        except KeyError:
            raise EventError(
                ErrorCode.UNKNOWN_VERSION,
                f"model {name!r} has no version {version!r}; versions: {self.versions(name)}",
            ) from None
